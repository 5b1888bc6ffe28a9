"""VAR's VQVAE on 512x512 images (the tokenizer of VAR-d36-s): the same weights as configs/vqvae_256.py, quantised
over the scales 1, 2, 3, 4, 6, 9, 13, 18, 24, 32 (2240 tokens)."""
from configs.common import parse_variants
from configs.vqvae_256 import PATCH_NUMS_512, vqvae_config


def get_config(arg=None):
    parse_variants(arg, (), "vqvae_512")
    return vqvae_config(512, PATCH_NUMS_512)
