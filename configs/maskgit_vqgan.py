"""The MaskGIT-VQGAN tokenizer of RAR and MaskGIT (`maskgit-vqgan-imagenet-f16-256.bin`, 54.5M params): 256x256x3
images in [0, 1] <-> 16x16 codes of a 1024 x 256 codebook. Load the released weights with
`python -m jaxgen.convert --family=maskgit_vqgan --config=configs/maskgit_vqgan.py --input=... --output=...`.

The training recipe of this tokenizer was never released (MaskGIT's JAX config mentions an entropy loss 0.1 and an
R1-penalised GAN); the settings below are jaxgen's own (L2 + VQ + the dead-code pull + entropy 0.1; LPIPS / GAN terms
go through MaskGITVQGANFamily.extra_losses), so training from scratch will not reach the released model's quality.
No variants.
"""
from configs.common import base_config, imagenet_data, parse_variants


def get_config(arg=None):
    parse_variants(arg, (), "maskgit_vqgan")
    c = base_config()
    c.family = "maskgit_vqgan"
    c.batch_size = 256
    c.total_steps = 500_000
    c.log_every = 100
    c.checkpoint_every = 5000
    c.compute_dtype = "bfloat16"

    m = c.model  # the official PretrainedTokenizer
    m.hidden_channels = 128
    m.channel_mult = (1, 1, 2, 2, 4)
    m.num_res_blocks = 2
    m.num_channels = 3
    m.z_channels = 256
    m.resolution = 256
    m.dropout = 0.0
    m.codebook_size = 1024
    m.commitment_cost = 0.25
    m.num_groups = 32
    m.norm_eps = 1e-6

    c.loss.recon_loss = "l2"
    c.loss.vq_weight = 1.0
    c.loss.dead_code_weight = 0.1
    c.loss.entropy_weight = 0.1
    c.loss.entropy_temperature = 0.01

    o = c.optim
    o.lr = 1e-4
    o.b1, o.b2 = 0.5, 0.9
    o.schedule = "cosine"
    o.warmup_steps = 5000
    o.end_factor = 0.1
    o.grad_clip = 1.0

    imagenet_data(c, 256)
    return c
