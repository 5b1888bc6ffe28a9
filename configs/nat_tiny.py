"""The whole AutoNAT pipeline on the bundled 32x32 digits, from scratch on a 2-core CPU.

Stage 1 trains `maskgit_vqgan_tiny` (32x32x1 <-> 8x8 codes of a 256-code book) in <workdir>/tokenizer, the codes of
every digit and its flip are cached once, and stage 2 trains a small U-ViT NAT on them: Beta(12, 3) mask ratios,
cross-entropy on the masked tokens with label smoothing 0.1, class dropout 0.15 (the official rules; sizes and the
schedule scaled down). Sampling: 8 parallel-decoding steps under AutoNAT's search starting policy (cosine ratios,
re-mask temperatures 1 -> 0.25, sampling temperatures 1, guidance k / T); `--mode=search` improves it.

Variants (`configs/nat_tiny.py:<arg>`):
  runlocal  a few steps of each stage and 4 decoding steps (smoke test of the whole pipeline)
  maskgit   the MaskGIT recipe on the same data: BERT backbone, cosine-schedule masking, cosine decoding with
            choice temperature 4.5, no guidance
"""
from configs import maskgit_vqgan_tiny
from configs.common import base_config, digits_data, parse_variants
from jaxgen.families.nat.policy import cosine_start

VARIANTS = ("runlocal", "maskgit")
STEPS = 8


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "nat_tiny")
    c = base_config()
    c.family = "nat"
    c.batch_size = 64
    c.total_steps = 1200  # with the tokenizer stage: under 15 minutes on 2 CPU cores
    c.log_every = 100
    c.checkpoint_every = 400
    c.sample_every = 0

    m = c.model
    m.backbone = "uvit"
    m.embed_dim = 128
    m.depth = 4  # 2 in + 1 mid + 2 out blocks
    m.num_heads = 4
    m.mlp_ratio = 4.0
    m.num_classes = 10
    m.emb_dropout = 0.0  # tiny data, few steps: dropout only slows learning here
    m.class_drop_prob = 0.15  # official p_uncond (the null class is what guidance needs)

    c.loss.mask_distribution = "beta"
    c.loss.beta_a, c.loss.beta_b = 12.0, 3.0
    c.loss.label_smoothing = 0.1

    o = c.optim
    o.lr = 1e-3
    o.b1, o.b2 = 0.9, 0.99
    o.weight_decay = 0.03
    o.schedule = "cosine"
    o.warmup_steps = 100
    o.end_factor = 0.05
    o.grad_clip = 1.0
    o.ema_decay = 0.0

    digits_data(c)
    c.data.cache = True  # the official code trains on pre-extracted codes

    c.tokenizer.config = maskgit_vqgan_tiny.get_config()

    s = c.sample
    s.steps = STEPS
    s.policy = "tables"
    start = cosine_start(STEPS)
    s.mask_ratios = tuple(start["mask_ratios"])
    s.remask_temps = tuple(start["remask_temps"])
    s.sample_temps = tuple(start["sample_temps"])
    s.guidance = tuple(start["guidance"])
    s.num_per_class = 100
    s.batch_size = 250
    s.use_ema = False

    if "maskgit" in variants:
        m.backbone = "maskgit"
        for key in ("embed_dim", "mlp_ratio", "emb_dropout", "class_drop_prob"):
            del m[key]
        m.hidden_size, m.depth, m.num_heads, m.mlp_dim = 128, 5, 4, 512
        m.dropout = m.attn_dropout = 0.0
        del c.loss.beta_a
        del c.loss.beta_b
        c.loss.mask_distribution, c.loss.mask_schedule = "schedule", "cosine"
        for key in ("mask_ratios", "remask_temps", "sample_temps", "guidance"):
            del s[key]
        s.policy, s.schedule, s.choice_temperature = "maskgit", "cosine", 4.5

    if "runlocal" in variants:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 10, 5, 5
        c.optim.warmup_steps = 2
        tok = c.tokenizer.config
        tok.batch_size, tok.total_steps, tok.log_every, tok.checkpoint_every = 16, 10, 5, 5
        tok.optim.warmup_steps = 2
        c.sample.num_per_class, c.sample.batch_size = 2, 20
        if s.policy == "tables":  # 4 decoding steps: a quicker smoke test (and 14 search knobs instead of 30)
            s.steps = 4
            for key, value in cosine_start(4).items():
                s[key] = tuple(value)
    return c
