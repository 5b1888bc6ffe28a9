"""RAR-L on ImageNet 256 with the official recipe and sampling settings (see configs/rar_common.py).
Variants (comma separated): folder, images, train_tokenizer."""
from configs.rar_common import VARIANTS, rar_config  # noqa: F401  (VARIANTS: what get_config accepts)


def get_config(arg=None):
    return rar_config("l", arg)
