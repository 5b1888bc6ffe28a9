"""Tiny multi-scale VQ tokenizer (VAR's VQVAE, scaled down) on the bundled 32x32 one-channel digits.

Stride 8: 32x32x1 images <-> a 4x4x8 feature map quantised over the scales (1, 2, 3, 4) with one 256-code book
(30 tokens per image). Same model and loss (L2 + multi-scale VQ with beta 0.25, straight-through; code-usage metrics;
the dead-code pull) as the full VQVAE (configs/vqvae_256.py); only sizes and the schedule are scaled down, sized for
2 CPU cores. The default tokenizer of configs/var_tiny.py. `get_config(arg)`: arg is unused.
"""
from configs.common import base_config, digits_data, parse_variants

PATCH_NUMS = (1, 2, 3, 4)


def get_config(arg=None):
    parse_variants(arg, (), "msvq_tiny")
    c = base_config()
    c.family = "msvq"
    c.batch_size = 64
    c.total_steps = 1200
    c.log_every = 100
    c.checkpoint_every = 400
    c.sample_every = 0  # a tokenizer has no class-conditional sampler

    m = c.model
    m.vocab_size = 256
    m.z_channels = 8
    m.ch = 8
    m.ch_mult = (1, 2, 2, 4)  # the 32x32 level, which costs the most, stays 8 channels wide
    m.num_res_blocks = 1
    m.num_groups = 4
    m.in_channels = 1
    m.using_sa = False  # attention on a 4x4 map buys little on digits and costs CPU time
    m.using_mid_sa = False
    m.dropout = 0.0
    m.beta = 0.25
    m.quant_resi = 0.5
    m.share_quant_resi = 4
    m.v_patch_nums = PATCH_NUMS
    c.loss.recon_loss = "l2"
    c.loss.vq_weight = 1.0
    c.loss.dead_code_weight = 0.1

    c.optim.lr = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.end_factor = 0.05
    c.optim.grad_clip = 1.0

    digits_data(c)
    return c
