"""MAR's KL-16 VAE (LTH14/mar models/vae.py `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`): 66.46M params,
256x256x3 images <-> 16x16x16 latents. Load the released weights with `jaxgen.convert.kl_vae.convert_kl_vae`.

Training settings follow the LDM kl-f16 recipe the authors used (batch 256, lr 1e-4, Adam betas (0.5, 0.9), L1 + KL 1e-6);
the LPIPS and patch-GAN terms of that recipe are not implemented (KLVAEFamily.extra_losses is the hook), so training
from scratch with this config will not reach the released model's quality.
"""
from configs.common import base_config, imagenet_data, parse_variants


def get_config(arg=None):
    parse_variants(arg, (), "kl16")
    c = base_config()
    c.family = "kl_vae"
    c.batch_size = 256

    m = c.model
    m.ch = 128
    m.ch_mult = (1, 1, 2, 2, 4)
    m.num_res_blocks = 2
    m.attn_resolutions = (16,)
    m.decoder_attn_resolutions = ()  # official MAR Decoder: attention only in its mid block
    m.resolution = 256
    m.in_channels = 3
    m.out_ch = 3
    m.z_channels = 16
    m.embed_dim = 16
    m.double_z = True
    m.dropout = 0.0
    m.num_groups = 32
    m.use_variational = True
    c.loss.recon_loss = "l1"
    c.loss.kl_weight = 1e-6
    m.scale_factor = 0.2325  # MAR multiplies posterior samples by this (1 / std of ImageNet latents)

    imagenet_data(c, 256)

    c.optim.lr = 1e-4
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.sample_every = 0  # a tokenizer has no class-conditional sampler
    return c
