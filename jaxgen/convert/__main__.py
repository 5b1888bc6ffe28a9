from jaxgen.convert.cli import entry

entry()
