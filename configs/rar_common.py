"""Shared RAR settings (Yu et al. 2024, "Randomized Autoregressive Visual Generation"; official bytedance/1d-tokenizer
README_RAR.md and configs/training/generator/rar.yaml) for configs/rar_{b,l,xl,xxl}.py.

`rar_config(size, arg)`: size in SIZES; arg is a comma list of variants:
  folder           read ImageNet from an image folder (config.data.data_dir) instead of TFDS
  images           encode each batch with the tokenizer inside the loss instead of training on cached codes
  train_tokenizer  train the MaskGIT-VQGAN from scratch when config.tokenizer.checkpoint is not given (by default
                   these configs stop and say how to convert the official maskgit-vqgan-imagenet-f16-256.bin)

Model: the official sizes (depth / width / MLP / 16 heads), dropout and attention dropout 0.1, class dropout 0.1.
Training: AdamW (0.9, 0.96), wd 0.03 (the official exclusions, see RARFamily), lr 4e-4, batch 2048, 250k steps
(400 epochs): linear warmup 62,500 steps, cosine to 1e-5; clip 1.0; bf16; no EMA; random orders with probability 1
until step 125k, annealed linearly to raster order by step 187.5k. The official data was pre-tokenized (ten-crop of a
281px centre crop); jaxgen caches the codes of each ADM crop and its flip (data.cache) and picks one per step.
Sampling: the README's per-size guidance scale, power and temperature; 50 images per class.
"""
from configs.common import base_config, imagenet_data, parse_variants
from configs.maskgit_vqgan import get_config as maskgit_vqgan_config
from jaxgen.families.rar.model import RAR_SIZES

VARIANTS = ("folder", "images", "train_tokenizer")
STEPS = 250_000
# guidance scale, scale power, temperature (README_RAR.md)
SAMPLING = {"b": (16.0, 2.75, 1.0), "l": (15.5, 2.5, 1.02), "xl": (6.9, 1.5, 1.02), "xxl": (8.0, 1.2, 1.02)}


def rar_config(size: str, arg=None):
    variants = parse_variants(arg, VARIANTS, f"rar_{size}")
    c = base_config()
    c.family = "rar"
    c.batch_size = 2048
    c.total_steps = STEPS
    c.log_every = 100
    c.checkpoint_every = 5000
    c.compute_dtype = "bfloat16"
    c.param_dtype = "float32"

    m = c.model
    for k, v in RAR_SIZES[size].items():
        m[k] = v
    m.num_classes = 1000
    m.dropout = 0.1
    m.attn_dropout = 0.1
    m.class_drop_prob = 0.1
    m.norm_eps = 1e-6

    c.loss.randomize_start = 125_000
    c.loss.randomize_end = 187_500

    o = c.optim
    o.name = "adamw"
    o.lr = 4e-4
    o.b1, o.b2 = 0.9, 0.96
    o.weight_decay = 0.03
    o.schedule = "cosine"
    o.warmup_steps = 62_500
    o.warmup_init = 0.0
    o.end_factor = 1e-5 / 4e-4
    o.grad_clip = 1.0
    o.ema_decay = 0.0

    imagenet_data(c, 256, folder="folder" in variants)
    c.eval.inception_score = "adm"  # the paper numbers come from ADM's evaluator.py
    c.data.cache = "images" not in variants  # the official pre-tokenized data
    c.tokenizer.config = maskgit_vqgan_config()  # its dataset is config.data (one for both stages)
    c.tokenizer.allow_training = "train_tokenizer" in variants

    s = c.sample
    s.guidance_scale, s.guidance_scale_pow, s.temperature = SAMPLING[size]
    # speed against memory: room for the adaLN modulations of the decode slots computed at once. RAR-B at batch 2:
    # 32 -> 16 slots (21 MB, peak RSS under the official code's); 96 -> 64 slots, ~5 % faster, 64 MB more
    s.modulation_mb = 32
    s.num_per_class = 50  # 50,000 images for FID-50K
    s.batch_size = 125
    s.use_ema = False
    return c
