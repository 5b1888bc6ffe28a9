"""Tiny MaskGIT-VQGAN on the bundled 32x32 one-channel digits: the default tokenizer of configs/rar_tiny.py.

Stride 4: 32x32x1 images <-> 8x8 codes (64 tokens per image) of a 256-code book. Same module (the official quirks:
avg-pool down, nearest up, the shortcut on the block output) and loss as configs/maskgit_vqgan.py; only sizes and the
schedule are scaled down for 2 CPU cores. No variants.
"""
from configs.common import base_config, digits_data, parse_variants


def get_config(arg=None):
    parse_variants(arg, (), "maskgit_vqgan_tiny")
    c = base_config()
    c.family = "maskgit_vqgan"
    c.batch_size = 64
    c.total_steps = 1200
    c.log_every = 100
    c.checkpoint_every = 400

    m = c.model
    m.hidden_channels = 8  # the 32x32 level costs the most: it stays 8 wide
    m.channel_mult = (1, 2, 4)
    m.num_res_blocks = 1
    m.num_channels = 1
    m.z_channels = 16
    m.resolution = 32
    m.dropout = 0.0
    m.codebook_size = 256
    m.commitment_cost = 0.25
    m.num_groups = 4
    m.norm_eps = 1e-6

    c.loss.recon_loss = "l2"
    c.loss.vq_weight = 1.0
    c.loss.dead_code_weight = 0.1
    c.loss.entropy_weight = 0.0

    c.optim.lr = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.end_factor = 0.05
    c.optim.grad_clip = 1.0

    digits_data(c)
    return c
