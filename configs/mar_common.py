"""Shared MAR settings (paper: Li et al. 2024, official LTH14/mar README and main_mar.py) for mar_b / mar_l / mar_h.

`mar_config(size, arg)`: size in SIZES; arg is a comma list of variants:
  cached          train on cached KL-16 moments (data.cache; `--mode=cache` fills the cache), as the paper did
  nocfg           sampling without CFG (cfg 1.0, temperature 0.95; paper Table 4 "w/o CFG")
  folder          read ImageNet from an image folder (config.data.data_dir) instead of TFDS
  train_tokenizer train the KL-16 tokenizer from scratch when config.tokenizer.checkpoint is not given (by default
                  these configs stop and say how to convert the official kl16.ckpt: the paper used it)
"""
from configs.common import base_config, imagenet_data, parse_variants

IMAGENET_TRAIN_IMAGES = 1281167

# width, depth (encoder = decoder), heads, DiffLoss (blocks, width), sampling cfg with CFG (Table 4 / README).
SIZES = {
    "b": dict(dim=768, depth=12, heads=12, diffloss_d=6, diffloss_w=1024, cfg=2.9),
    "l": dict(dim=1024, depth=16, heads=16, diffloss_d=8, diffloss_w=1280, cfg=3.0),
    "h": dict(dim=1280, depth=20, heads=16, diffloss_d=12, diffloss_w=1536, cfg=3.2),
}
VARIANTS = ("cached", "nocfg", "folder", "train_tokenizer")


def kl16_tokenizer_config():
    """The official KL-16 tokenizer, as the stage-1 run config."""
    from configs import kl16

    return kl16.get_config()


def mar_config(size: str, arg=None):
    s = SIZES[size]
    variants = parse_variants(arg, VARIANTS, f"mar_{size}")
    c = base_config()
    c.family = "mar"
    c.batch_size = 2048
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size  # drop_last, as the official loader
    c.total_steps = 800 * steps_per_epoch  # Table 4 models: 800 epochs
    c.log_every = 100
    c.checkpoint_every = 5 * steps_per_epoch
    c.compute_dtype = "bfloat16"  # the official run used fp16 autocast; bf16 needs no loss scaling
    c.param_dtype = "float32"

    m = c.model
    m.img_size = 256
    m.vae_stride = 16
    m.patch_size = 1
    m.vae_embed_dim = 16
    m.encoder_embed_dim = m.decoder_embed_dim = s["dim"]
    m.encoder_depth = m.decoder_depth = s["depth"]
    m.encoder_num_heads = m.decoder_num_heads = s["heads"]
    m.mlp_ratio = 4.0
    m.norm_eps = 1e-6
    m.class_num = 1000
    m.buffer_size = 64
    m.label_drop_prob = 0.1
    m.attn_dropout = 0.1
    m.proj_dropout = 0.1
    m.diffloss_d = s["diffloss_d"]
    m.diffloss_w = s["diffloss_w"]
    m.diffusion_batch_mul = 4
    m.mask_ratio_min = 0.7

    o = c.optim
    o.name = "adamw"
    o.blr = 1e-4  # lr = blr * batch / 256 = 8e-4 at batch 2048
    o.b1, o.b2 = 0.9, 0.95
    o.weight_decay = 0.02
    o.schedule = "constant"  # linear warmup from 0, then constant
    o.warmup_steps = 100 * steps_per_epoch
    o.warmup_init = 0.0
    o.grad_clip = 3.0
    o.ema_decay = 0.9999

    imagenet_data(c, 256, folder="folder" in variants)
    c.tokenizer.config = kl16_tokenizer_config()  # its dataset is config.data (one dataset for both stages)
    c.tokenizer.allow_training = "train_tokenizer" in variants
    if "cached" in variants:
        c.data.cache = True  # moments of each crop and its flip; the loss samples the posterior
        # random_flip stays on: the cache holds the moments of each crop and its flip, one is picked with p 0.5

    sp = c.sample
    sp.num_iter = 256
    sp.cfg = 1.0 if "nocfg" in variants else s["cfg"]
    sp.cfg_schedule = "linear"
    sp.temperature = 0.95 if "nocfg" in variants else 1.0
    sp.num_sampling_steps = "100"
    sp.num_per_class = 50  # 50,000 images for FID-50K
    sp.batch_size = 256
    sp.use_ema = True
    return c
