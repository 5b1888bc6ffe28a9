"""MaskGIT on ImageNet 256 (Chang et al., CVPR 2022; official google-research/maskgit, inference-only release):
BERT transformer, 24 layers, width 768, 16 heads, FFN 3072, post-LN eps 1e-12, tanh GELU, dropout 0.1, tied MLM head;
vocabulary 1024 codes + 1000 classes + mask. Sampling: 8 steps (the paper's FID 6.18 setting), cosine schedule,
choice temperature 4.5, no guidance. Training follows maskgit_class_cond_config.py (AdamW lr 1e-4, betas (0.9,
0.96), weight decay 0.045, 5k warmup, batch 256, label smoothing 0.1, cosine masking); its training loop was never
released, so the loss is jaxgen's (the AutoNAT rule with gamma(r) ratios, r ~ U[0, 1)).
Weights: python -m jaxgen.convert --family=nat --config=configs/maskgit.py --input=maskgit_imagenet256_checkpoint
--output=weights/maskgit; tokenizer: configs/maskgit_vqgan.py (the MaskGIT VQGAN, as RAR uses).

Variants (comma separated): folder, images, train_tokenizer (as configs/autonat_l.py).
"""
from configs.common import base_config, imagenet_data, parse_variants
from configs.maskgit_vqgan import get_config as maskgit_vqgan_config
from jaxgen.families.nat.model import MASKGIT_SIZES

VARIANTS = ("folder", "images", "train_tokenizer")


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "maskgit")
    c = base_config()
    c.family = "nat"
    c.batch_size = 256
    c.total_steps = 2_000_000
    c.log_every = 100
    c.checkpoint_every = 10_000
    c.compute_dtype = "bfloat16"

    m = c.model
    m.backbone = "maskgit"
    for k, v in MASKGIT_SIZES["base"].items():
        m[k] = v
    m.num_classes = 1000
    m.dropout = 0.1
    m.attn_dropout = 0.1
    m.norm_eps = 1e-12

    c.loss.mask_distribution = "schedule"
    c.loss.mask_schedule = "cosine"
    c.loss.label_smoothing = 0.1

    o = c.optim
    o.name = "adamw"
    o.lr = 1e-4
    o.b1, o.b2 = 0.9, 0.96
    o.weight_decay = 0.045
    o.schedule = "constant"
    o.warmup_steps = 5000

    imagenet_data(c, 256, folder="folder" in variants)
    c.eval.inception_score = "adm"  # the paper numbers come from ADM's evaluator.py
    c.data.cache = "images" not in variants
    c.tokenizer.config = maskgit_vqgan_config()
    c.tokenizer.allow_training = "train_tokenizer" in variants

    s = c.sample
    s.steps = 8
    s.policy = "maskgit"
    s.schedule = "cosine"
    s.choice_temperature = 4.5
    s.num_per_class = 50
    s.batch_size = 125
    s.use_ema = False
    return c
