"""VAR's multi-scale VQVAE (FoundationVision/VAR `vae_ch160v4096z32.pth`): 108.9M params, 256x256x3 images <-> a
16x16x32 feature map quantised over the scales 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 (680 tokens) with one 4096-code book.
Load the released weights with `python -m jaxgen.convert --family=msvq --config=configs/vqvae_256.py ...`.

The official VQVAE training code and recipe were never released (trained on OpenImages; reportedly L2 + LPIPS + GAN
with unknown weights). The optimizer settings below are jaxgen's own choice (the usual VQGAN ones: batch 256, Adam
betas (0.5, 0.9), lr 1e-4); only the L2 + VQ part of the loss is implemented (MSVQFamily.extra_losses is the hook for
LPIPS / GAN terms), so training from scratch with this config will not reach the released model's quality.
"""
from configs.common import base_config, imagenet_data, parse_variants

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # VAR-d36-s: the same VQVAE on 512px images


def vqvae_config(image_size: int = 256, patch_nums=PATCH_NUMS_256):
    c = base_config()
    c.family = "msvq"
    c.batch_size = 256
    c.total_steps = 500_000
    c.log_every = 100
    c.checkpoint_every = 5000
    c.compute_dtype = "bfloat16"
    c.sample_every = 0  # a tokenizer has no class-conditional sampler

    m = c.model
    m.vocab_size = 4096
    m.z_channels = 32
    m.ch = 160
    m.ch_mult = (1, 1, 2, 2, 4)
    m.num_res_blocks = 2
    m.num_groups = 32
    m.in_channels = 3
    m.using_sa = True
    m.using_mid_sa = True
    m.dropout = 0.0
    m.beta = 0.25
    m.using_znorm = False
    m.quant_conv_ks = 3
    m.quant_resi = 0.5
    m.share_quant_resi = 4
    m.v_patch_nums = tuple(patch_nums)
    c.loss.recon_loss = "l2"
    c.loss.vq_weight = 1.0
    c.loss.dead_code_weight = 0.1

    o = c.optim
    o.lr = 1e-4
    o.b1, o.b2 = 0.5, 0.9
    o.weight_decay = 0.0
    o.schedule = "cosine"
    o.warmup_steps = 5000
    o.end_factor = 0.1
    o.grad_clip = 1.0

    imagenet_data(c, image_size)
    return c


def get_config(arg=None):
    parse_variants(arg, (), "vqvae_256")
    return vqvae_config(256, PATCH_NUMS_256)
