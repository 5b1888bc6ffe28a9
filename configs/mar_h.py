"""MAR-H on ImageNet 256 (paper Table 4 settings).
Variants: `:cached`, `:nocfg`, `:folder`, `:train_tokenizer` (comma separated; see configs/mar_common.py)."""
from configs.mar_common import VARIANTS, mar_config  # noqa: F401  (VARIANTS: what get_config accepts)


def get_config(arg=None):
    return mar_config("h", arg)
