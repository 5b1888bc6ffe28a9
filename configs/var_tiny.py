"""The whole VAR pipeline on the bundled 32x32 digits, from scratch on a 2-core CPU.

Stage 1 trains `msvq_tiny` (32x32x1 images <-> token maps 1x1, 2x2, 3x3, 4x4 of a 256-code book) in
<workdir>/tokenizer; stage 2 trains a small VAR on the token pyramid (30 tokens per image) by teacher forcing, the
tokenizer encoding each batch inside the loss. Same model, loss, optimizer rules and sampler as the paper configs;
only sizes and the schedule are scaled down.

Variants (`configs/var_tiny.py:<arg>`):
  runlocal  a few steps of each stage (smoke test of the whole pipeline)
"""
from configs import msvq_tiny
from configs.common import base_config, digits_data, parse_variants

VARIANTS = ("runlocal",)


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "var_tiny")

    c = base_config()
    c.family = "var"
    c.batch_size = 64
    c.total_steps = 1000  # class_consistency 0.997 after 1000 steps (docs/results.md)
    c.log_every = 100
    c.checkpoint_every = 500
    c.sample_every = 0

    m = c.model
    m.depth = 4
    m.embed_dim = 128  # the official rule (64 * depth, depth heads) would give 256 wide; too slow for this CPU
    m.num_heads = 4
    m.mlp_ratio = 4.0
    m.drop_path_rate = 0.0  # 0.1 * depth / 24 is ~0 anyway at this size
    m.cond_drop_rate = 0.1
    m.attn_l2_norm = True
    m.shared_aln = False
    m.init_adaln = 0.5
    m.init_adaln_gamma = 1e-3
    m.init_head = 0.02
    m.num_classes = 10
    c.loss.label_smoothing = 0.0

    o = c.optim
    o.lr = 1e-3
    o.b1, o.b2 = 0.9, 0.95
    o.weight_decay = 0.05
    o.schedule = "lin0"
    o.warmup_steps = 100
    o.warmup_init = 0.005
    o.end_factor = 0.1
    o.grad_clip = 2.0
    o.ema_decay = 0.0  # VAR trains without EMA

    digits_data(c)  # images; the tokenizer encodes each batch inside the loss

    c.tokenizer.config = msvq_tiny.get_config()

    s = c.sample
    s.cfg = 2.0
    s.top_k = 0
    s.top_p = 0.0
    s.more_smooth = False
    s.num_per_class = 100
    s.batch_size = 250
    s.use_ema = False

    if "runlocal" in variants:
        c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
        c.optim.warmup_steps = 5
        c.tokenizer.config.total_steps = 20
        c.tokenizer.config.log_every = 5
        c.tokenizer.config.checkpoint_every = 10
        c.sample.num_per_class = 4
    return c
