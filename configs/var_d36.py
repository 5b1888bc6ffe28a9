"""VAR-d36-s (512px, shared AdaLN) with the official recipe (see configs/var_common.py).
Variants (comma separated): no_l2norm, folder, train_tokenizer (see configs/var_common.py)."""
from configs.var_common import VARIANTS, var_config  # noqa: F401  (VARIANTS: what get_config accepts)


def get_config(arg=None):
    return var_config(36, arg)
