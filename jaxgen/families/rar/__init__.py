"""RAR: randomized autoregressive generation (bytedance/1d-tokenizer) on MaskGIT-VQGAN tokens."""
