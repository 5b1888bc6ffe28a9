"""MAR-B on ImageNet 256 (paper Table 4 settings). Variants: `:cached`, `:nocfg`, `:folder` (comma separated)."""
from configs.mar_common import mar_config


def get_config(arg=None):
    return mar_config("b", arg)
