"""VAR: next-scale prediction (FoundationVision/VAR) on the multi-scale VQ tokenizer (`jaxgen.tokenizers.msvq`)."""
