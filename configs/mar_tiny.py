"""The default job: the whole MAR pipeline on the bundled 32x32 MNIST digits, from scratch on a 2-core CPU.

Stage 1 trains `kl_vae_tiny` (32x32x1 <-> 8x8x4 latents) in <workdir>/tokenizer, the latents of every digit and its
flip are cached once (`--mode=cache`, done automatically), and stage 2 trains a small MAR on them. Same model, loss
and sampler as the paper configs; only sizes and the schedule are scaled down.

Variants (`configs/mar_tiny.py:<arg>`):
  runlocal  a few steps of each stage (smoke test of the whole pipeline in about a minute)
"""
from configs import kl_vae_tiny
from configs.common import base_config, digits_data, parse_variants

VARIANTS = ("runlocal",)


def get_config(arg=None):
    variants = parse_variants(arg, VARIANTS, "mar_tiny")

    c = base_config()
    c.family = "mar"
    c.batch_size = 128
    c.total_steps = 1600
    c.log_every = 100
    c.checkpoint_every = 400
    c.sample_every = 1600  # one TensorBoard / PNG grid at the end (sampling is the slow part on a CPU)

    m = c.model
    m.img_size = 32  # pixels; latents are img_size / vae_stride = 8 per side
    m.vae_stride = 4
    m.patch_size = 2  # 4 x 4 = 16 tokens of dim 4 * 2 * 2 = 16
    m.vae_embed_dim = 4
    m.encoder_embed_dim = m.decoder_embed_dim = 128
    m.encoder_depth = m.decoder_depth = 3
    m.encoder_num_heads = m.decoder_num_heads = 4
    m.mlp_ratio = 4.0
    m.norm_eps = 1e-6
    m.class_num = 10
    m.buffer_size = 4
    m.label_drop_prob = 0.1
    m.attn_dropout = 0.0  # tiny data, few steps: dropout only slows learning here
    m.proj_dropout = 0.0
    m.diffloss_d = 2
    m.diffloss_w = 128
    m.diffusion_batch_mul = 4

    o = c.optim
    o.lr = 1e-3
    o.b1, o.b2 = 0.9, 0.95
    o.weight_decay = 0.02
    o.schedule = "cosine"
    o.warmup_steps = 200
    o.end_factor = 0.05
    o.grad_clip = 3.0
    # No EMA here: an average of the fast-moving weights of a 1,600-step run is a worse denoiser than the last
    # weights (the paper's 0.9999 averages over ~500k steps). Sampling uses the raw params.
    o.ema_decay = 0.0

    digits_data(c)
    c.data.cache = True  # MAR's paper setup: moments of each digit and its flip, cached by --mode=cache

    c.tokenizer.config = kl_vae_tiny.get_config()

    s = c.sample
    s.num_iter = 8
    s.cfg = 3.0
    s.cfg_schedule = "linear"
    s.temperature = 1.0
    # All 1000 DDPM steps, not the paper's respaced "100": at t = 999 (alpha_bar ~ 2e-9) the x0 estimate
    # multiplies the eps error by ~2e4, and a respaced first step (999 -> 989) carries ~1.5% of it forward; a
    # small, briefly trained head is not precise enough there, while the unrespaced chain damps it away.
    s.num_sampling_steps = "1000"
    s.num_per_class = 100
    s.batch_size = 250
    s.use_ema = False

    if "runlocal" in variants:
        c.batch_size, c.total_steps, c.log_every, c.checkpoint_every, c.sample_every = 16, 10, 5, 5, 10
        c.optim.warmup_steps = 2
        tok = c.tokenizer.config
        tok.batch_size, tok.total_steps, tok.log_every, tok.checkpoint_every = 16, 10, 5, 5
        tok.optim.warmup_steps = 2
        c.sample.num_per_class, c.sample.batch_size = 2, 20
        c.sample.num_iter, c.sample.num_sampling_steps = 4, "5"
    return c
