"""`python tests/slow_main.py SECONDS <jaxgen.main flags>`: the jaxgen CLI with every training step taking at least
SECONDS (a trainer callback), so kill / SIGTERM tests can interrupt a run mid-way."""
import sys
import time


class SlowSteps:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step(self, trainer, step):
        time.sleep(self.seconds)


if __name__ == "__main__":
    seconds = float(sys.argv.pop(1))
    from jaxgen import main

    main.entry(callbacks=[SlowSteps(seconds)])
