"""AutoNAT-L on ImageNet 256 (Ni et al., CVPR 2024, "Revisiting Non-Autoregressive Transformers for Efficient Image
Synthesis"; official LeapLabTHU/ImprovedNAT configs/AutoNAT_L.yaml and AutoNAT_L-T8_strategy.yaml).

Model: U-ViT, width 768, 12 in + 1 mid + 12 out blocks, 8 heads, MLP ratio 4, no qkv bias, token-embedding dropout
0.1, class dropout 0.15 (p_uncond). Training: Beta(12, 3) mask ratios, label smoothing 0.1, AdamW lr 4e-4 with betas
(0.99, 0.99) and weight decay 0.03 on every parameter, 5k warmup steps then constant, batch 2048, 500k steps, EMA
0.9999, no gradient clipping, on pre-extracted codes. Sampling: the released T = 8 policy, 50 images per class.
Tokenizer: the MaskGIT-VQGAN architecture with MAGE's weights (`vqgan_jax_strongaug.ckpt`):
  python -m jaxgen.convert --family=mage_vqgan --config=configs/maskgit_vqgan.py --input=vqgan_jax_strongaug.ckpt \
      --output=weights/mage_vqgan
  python -m jaxgen.convert --family=nat --config=configs/autonat_l.py --input=nnet_ema.pth --output=weights/autonat_l
then --config.tokenizer.checkpoint=weights/mage_vqgan.

Variants (comma separated): folder (ImageNet from an image folder), images (encode inside the loss instead of
cached codes), train_tokenizer (train the VQGAN when no checkpoint is given).
"""
from configs.common import base_config, imagenet_data, parse_variants
from configs.maskgit_vqgan import get_config as maskgit_vqgan_config
from jaxgen.families.nat.model import UVIT_SIZES
from jaxgen.families.nat.policy import AUTONAT_L_T8

VARIANTS = ("folder", "images", "train_tokenizer")


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "autonat_l")
    c = base_config()
    c.family = "nat"
    c.batch_size = 2048
    c.total_steps = 500_000
    c.log_every = 50
    c.checkpoint_every = 5000
    c.compute_dtype = "bfloat16"  # official: accelerate mixed precision
    c.param_dtype = "float32"

    m = c.model
    m.backbone = "uvit"
    for k, v in UVIT_SIZES["l"].items():
        m[k] = v
    m.num_classes = 1000
    m.emb_dropout = 0.1
    m.class_drop_prob = 0.15
    m.norm_eps = 1e-5
    m.emb_norm_eps = 1e-6

    c.loss.mask_distribution = "beta"
    c.loss.beta_a, c.loss.beta_b = 12.0, 3.0
    c.loss.label_smoothing = 0.1

    o = c.optim
    o.name = "adamw"
    o.lr = 4e-4
    o.b1, o.b2 = 0.99, 0.99
    o.weight_decay = 0.03
    o.schedule = "constant"
    o.warmup_steps = 5000
    o.grad_clip = 0.0
    o.ema_decay = 0.9999

    imagenet_data(c, 256, folder="folder" in variants)
    c.data.cache = "images" not in variants
    c.tokenizer.config = maskgit_vqgan_config()
    c.tokenizer.allow_training = "train_tokenizer" in variants

    s = c.sample
    s.steps = 8
    s.policy = "tables"
    for k, v in AUTONAT_L_T8.items():
        s[k] = v
    s.num_per_class = 50
    s.batch_size = 125  # official test_bsz
    s.use_ema = True
    return c
