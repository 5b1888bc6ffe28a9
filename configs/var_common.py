"""Shared VAR settings (Tian et al. 2024; official FoundationVision/VAR README, train.py, utils/arg_util.py) for
configs/var_d{16,20,24,30,36}.py.

`var_config(depth, arg)`: depth in RECIPES; arg is a comma list of variants:
  no_l2norm        plain scaled attention, for checkpoints without `scale_mul_1H11` (older uploads)
  folder           read ImageNet from an image folder (config.data.data_dir) instead of TFDS
  train_tokenizer  train the VQVAE from scratch when config.tokenizer.checkpoint is not given (by default these
                   configs stop and say how to convert the official vae_ch160v4096z32.pth: the paper used it)

Model: width 64*depth, depth heads, drop path 0.1*depth/24 (rising linearly over the blocks), cond drop 0.1, AdaLN gamma
init `alng`; d36 uses shared AdaLN at 512px. Optimizer: AdamW (0.9, 0.95), wd 0.05 (the official no-decay list, see
VARFamily), peak lr = tblr * batch / 256, linear warmup from 0.005x peak over epochs/50 epochs, then "lin0" (hold 5%,
linear down to wpe x peak), grad clip 2.0, no EMA. Sampling: the README's FID settings (cfg 1.5, top-k 900,
top-p 0.96, 50 images per class).
Differences: the official loader resizes the short side to 288 (Lanczos) and random-crops 256; jaxgen's ImageNet
pipeline gives its own 256px crops. Progressive training (off by default officially) is available as
config.loss.train_scales (see jaxgen/families/var/family.py).
"""
from configs.common import base_config, imagenet_data, parse_variants
from configs.vqvae_256 import PATCH_NUMS_256, PATCH_NUMS_512, vqvae_config

IMAGENET_TRAIN_IMAGES = 1281167

# The official recipes (README / arg_util.py): batch, epochs, tblr, alng (AdaLN gamma init), wpe (final lr / peak).
RECIPES = {
    16: dict(batch=768, epochs=200, tblr=1e-4, alng=1e-3, wpe=0.1),
    20: dict(batch=768, epochs=250, tblr=1e-4, alng=1e-3, wpe=0.1),
    24: dict(batch=768, epochs=350, tblr=8e-5, alng=1e-4, wpe=0.01),
    30: dict(batch=1024, epochs=350, tblr=8e-5, alng=1e-5, wpe=0.01),
    36: dict(batch=768, epochs=350, tblr=8e-5, alng=5e-6, wpe=0.01, image_size=512, shared_aln=True),
}
VARIANTS = ("no_l2norm", "folder", "train_tokenizer")


def var_config(depth: int, arg=None):
    r = RECIPES[depth]
    variants = parse_variants(arg, VARIANTS, f"var_d{depth}")
    image_size = r.get("image_size", 256)
    patch_nums = PATCH_NUMS_512 if image_size == 512 else PATCH_NUMS_256

    c = base_config()
    c.family = "var"
    c.batch_size = r["batch"]
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
    c.total_steps = r["epochs"] * steps_per_epoch
    c.log_every = 100
    c.checkpoint_every = 5 * steps_per_epoch
    c.compute_dtype = "bfloat16"  # the official runs used mixed precision
    c.param_dtype = "float32"

    m = c.model
    m.depth = depth  # width 64 * depth, depth heads (var_from_config)
    m.mlp_ratio = 4.0
    m.drop_path_rate = 0.1 * depth / 24
    m.norm_eps = 1e-6
    m.cond_drop_rate = 0.1
    m.attn_l2_norm = "no_l2norm" not in variants
    m.shared_aln = bool(r.get("shared_aln", False))
    m.patch_nums = patch_nums
    m.num_classes = 1000
    m.init_adaln = 0.5
    m.init_adaln_gamma = r["alng"]
    m.init_head = 0.02
    m.init_std = -1.0  # sqrt(1 / (3 * width))
    m.attn_chunk_tokens = 64  # speed only: block-causal attention per chunk of scales (0: one dense masked pass)
    c.loss.label_smoothing = 0.0
    c.loss.train_scales = 0  # all scales (no progressive training)

    o = c.optim
    o.name = "adamw"
    o.blr = r["tblr"]  # peak lr = tblr * batch / 256
    o.b1, o.b2 = 0.9, 0.95
    o.weight_decay = 0.05
    o.schedule = "lin0"
    o.warmup_steps = round(r["epochs"] / 50 * steps_per_epoch)
    o.warmup_init = 0.005
    o.end_factor = r["wpe"]
    o.grad_clip = 2.0
    o.ema_decay = 0.0

    imagenet_data(c, image_size, folder="folder" in variants, random_flip=False)  # the official loader does not flip
    c.eval.inception_score = "adm"  # the paper numbers come from ADM's evaluator.py
    c.tokenizer.config = vqvae_config(image_size, patch_nums)  # its dataset is config.data (one for both stages)
    c.tokenizer.data.random_flip = True  # the tokenizer stage flips (jaxgen's choice), VAR itself does not
    c.tokenizer.allow_training = "train_tokenizer" in variants

    s = c.sample
    s.cfg = 1.5
    s.top_k = 900
    s.top_p = 0.96
    s.more_smooth = False
    s.num_per_class = 50  # 50,000 images for FID-50K
    s.batch_size = 250
    s.use_ema = False
    return c
