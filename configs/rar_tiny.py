"""The whole RAR pipeline on the bundled 32x32 digits, from scratch on a 2-core CPU.

Stage 1 trains `maskgit_vqgan_tiny` (32x32x1 <-> 8x8 codes of a 256-code book) in <workdir>/tokenizer, the codes of
every digit and its flip are cached once (as the official code pre-tokenizes), and stage 2 trains a small RAR on them:
random token orders with probability 1 for the first half, annealed to raster order by three quarters (the official
fractions of its 250k steps). Same model, loss, optimizer rules and KV-cached sampler as the paper configs; only sizes
and the schedule are scaled down.

Variants (`configs/rar_tiny.py:<arg>`):
  runlocal  a few steps of each stage (smoke test of the whole pipeline)
"""
from configs import maskgit_vqgan_tiny
from configs.common import base_config, digits_data, parse_variants

VARIANTS = ("runlocal",)


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "rar_tiny")
    c = base_config()
    c.family = "rar"
    c.batch_size = 64
    c.total_steps = 1600
    c.log_every = 100
    c.checkpoint_every = 400
    c.sample_every = 0

    m = c.model
    m.hidden_size = 128
    m.depth = 4
    m.num_heads = 4
    m.mlp_dim = 512
    m.num_classes = 10
    m.dropout = 0.0  # tiny data, few steps: dropout only slows learning here
    m.attn_dropout = 0.0
    m.class_drop_prob = 0.1
    m.norm_eps = 1e-6

    c.loss.randomize_start = 800  # half of the steps, as the official 125k of 250k
    c.loss.randomize_end = 1200  # three quarters, as 187.5k of 250k

    o = c.optim
    o.lr = 1e-3
    o.b1, o.b2 = 0.9, 0.96
    o.weight_decay = 0.03
    o.schedule = "cosine"
    o.warmup_steps = 100
    o.end_factor = 0.05
    o.grad_clip = 1.0
    o.ema_decay = 0.0

    digits_data(c)
    c.data.cache = True  # the official code trains on pre-tokenized images

    c.tokenizer.config = maskgit_vqgan_tiny.get_config()

    s = c.sample
    s.guidance_scale = 4.0
    s.guidance_scale_pow = 1.0
    s.temperature = 1.0
    s.modulation_mb = 96  # speed only: room for adaLN modulations computed ahead (RAR-B batch 2: 64 slots)
    s.num_per_class = 100
    s.batch_size = 250
    s.use_ema = False

    if "runlocal" in variants:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 10, 5, 5
        c.optim.warmup_steps = 2
        c.loss.randomize_start, c.loss.randomize_end = 4, 8
        tok = c.tokenizer.config
        tok.batch_size, tok.total_steps, tok.log_every, tok.checkpoint_every = 16, 10, 5, 5
        tok.optim.warmup_steps = 2
        c.sample.num_per_class, c.sample.batch_size = 2, 20
    return c
