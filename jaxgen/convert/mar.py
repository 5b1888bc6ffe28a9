"""Official MAR state_dict (LTH14/mar `MAR.state_dict()`, or a checkpoint's ['model'] / ['model_ema']) -> jaxgen params.

Keys: fake_latent, {encoder,decoder,diffusion}_pos_embed_learned, mask_token, class_emb.weight, z_proj, z_proj_ln,
{encoder,decoder}_blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, {encoder,decoder}_norm,
decoder_embed, diffloss.net.* (handed to `convert_simple_mlp_adaln`). Returned arrays are float32 numpy; the tree
matches `MAR` params (per-block `block_i`, or stacked `layers/block` when the config scans layers).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import jax
import numpy as np

from jaxgen.convert.diffloss import convert_simple_mlp_adaln
from jaxgen.convert.torch_layout import check_tree_shapes, embedding, linear, norm

DIFFLOSS_PREFIX = "diffloss.net."
_FREE = ("fake_latent", "encoder_pos_embed_learned", "mask_token", "decoder_pos_embed_learned",
         "diffusion_pos_embed_learned")
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")

# Official factories: width -> heads (head count cannot be read from a state_dict).
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}


def _is_run_config(config) -> bool:
    return "model" in config if isinstance(config, Mapping) else hasattr(config, "model")


def _model_fields(config):
    """(config.model-like mapping, scan_layers) from a full run config or a bare model config."""
    if _is_run_config(config):
        model = config["model"] if isinstance(config, Mapping) else config.model
        return model, bool(config.get("scan_layers", False))
    return config, False


def expected_mar_keys(encoder_depth: int, decoder_depth: int) -> List[str]:
    """The non-diffloss state_dict keys of a MAR with these depths."""
    keys = list(_FREE) + ["class_emb.weight"]
    for name in ("z_proj", "z_proj_ln", "encoder_norm", "decoder_embed", "decoder_norm"):
        keys += [f"{name}.weight", f"{name}.bias"]
    for side, depth in (("encoder", encoder_depth), ("decoder", decoder_depth)):
        for i in range(depth):
            keys += [f"{side}_blocks.{i}.{part}.{wb}" for part in _BLOCK_PARTS for wb in ("weight", "bias")]
    return keys


def _block(sd, p: str) -> Dict:
    return {"norm1": norm(sd, p + ".norm1"),
            "attn": {"qkv": linear(sd, p + ".attn.qkv"), "proj": linear(sd, p + ".attn.proj")},
            "norm2": norm(sd, p + ".norm2"),
            "mlp": {"fc1": linear(sd, p + ".mlp.fc1"), "fc2": linear(sd, p + ".mlp.fc2")}}


def _blocks(sd, prefix: str, depth: int, scan: bool) -> Dict:
    blocks = [_block(sd, f"{prefix}.{i}") for i in range(depth)]
    if scan:  # nn.scan layout: one subtree, leading depth axis
        return {"layers": {"block": jax.tree_util.tree_map(lambda *a: np.stack(a), *blocks)}}
    return {f"block_{i}": b for i, b in enumerate(blocks)}


def _depths_in(sd) -> Dict[str, int]:
    out = {}
    for side in ("encoder", "decoder"):
        idx = {int(m.group(1)) for k in sd for m in [re.match(rf"{side}_blocks\.(\d+)\.", k)] if m}
        out[side] = (max(idx) + 1) if idx else 0
    return out


def convert_mar(sd: Mapping[str, np.ndarray], config, check_shapes: bool = True) -> Dict:
    """Convert an official MAR state_dict for the model described by `config` (run config or config.model).

    Raises ValueError naming missing / unexpected keys, or (check_shapes) every shape that differs from the model.
    """
    model_cfg, scan = _model_fields(config)
    enc_depth, dec_depth = int(model_cfg["encoder_depth"]), int(model_cfg["decoder_depth"])
    expected = set(expected_mar_keys(enc_depth, dec_depth))
    own = {k for k in sd if not k.startswith(DIFFLOSS_PREFIX)}
    missing = sorted(expected - own)
    unexpected = sorted(own - expected)
    if missing or unexpected:
        found = _depths_in(sd)
        raise ValueError(
            f"MAR state_dict does not match the config (encoder_depth {enc_depth}, decoder_depth {dec_depth}; "
            f"the state_dict has {found['encoder']} encoder / {found['decoder']} decoder blocks): "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if not any(k.startswith(DIFFLOSS_PREFIX) for k in sd):
        raise ValueError(f"MAR state_dict has no diffusion-head keys ('{DIFFLOSS_PREFIX}*')")

    def free(name):
        return np.asarray(sd[name], np.float32)

    params = {name: free(name) for name in _FREE}
    params.update({
        "class_emb": embedding(sd, "class_emb"),
        "z_proj": linear(sd, "z_proj"),
        "z_proj_ln": norm(sd, "z_proj_ln"),
        "encoder_blocks": _blocks(sd, "encoder_blocks", enc_depth, scan),
        "encoder_norm": norm(sd, "encoder_norm"),
        "decoder_embed": linear(sd, "decoder_embed"),
        "decoder_blocks": _blocks(sd, "decoder_blocks", dec_depth, scan),
        "decoder_norm": norm(sd, "decoder_norm"),
    })
    head_sd = {k: v for k, v in sd.items() if k.startswith(DIFFLOSS_PREFIX)}
    params["diffloss"] = convert_simple_mlp_adaln(head_sd, prefix=DIFFLOSS_PREFIX)

    if check_shapes:
        import jax

        from jaxgen import strict
        from jaxgen.families.mar.model import MAR, init_params
        from jaxgen.train.restore import abstract_of

        model = strict.build(MAR, model_cfg, "MAR model fields", scan_layers=scan)
        check_tree_shapes(params, abstract_of(lambda: init_params(model, jax.random.PRNGKey(0))),
                          what="converted MAR params")
    return params


def mar_config_from_state_dict(sd: Mapping[str, np.ndarray], num_heads: Optional[int] = None,
                               img_size: Optional[int] = None, vae_stride: int = 16) -> Dict:
    """Read MAR sizes off a state_dict (heads from the official width table unless given).

    Returns a dict of config.model fields. img_size defaults to sqrt(seq_len) * vae_stride (patch_size 1 assumed
    unless the token dim says otherwise with vae_embed_dim 16).
    """
    need = ("z_proj.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned", "class_emb.weight",
            "decoder_embed.weight", "encoder_blocks.0.mlp.fc1.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"not a MAR state_dict: missing {absent}")
    d, token_dim = np.shape(sd["z_proj.weight"])
    dd = np.shape(sd["decoder_embed.weight"])[0]
    seq_len = np.shape(sd["diffusion_pos_embed_learned"])[1]
    total = np.shape(sd["encoder_pos_embed_learned"])[1]
    vae_embed_dim = 16
    patch = int(round(np.sqrt(token_dim / vae_embed_dim)))
    side = int(round(np.sqrt(seq_len)))
    depths = _depths_in(sd)
    heads = num_heads or _HEADS_BY_WIDTH.get(int(d))
    dec_heads = num_heads or _HEADS_BY_WIDTH.get(int(dd))
    if heads is None or dec_heads is None:
        raise ValueError(f"cannot infer the number of heads for width {d}/{dd}; pass num_heads")
    res_idx = {int(m.group(1)) for k in sd for m in [re.match(r"diffloss\.net\.res_blocks\.(\d+)\.", k)] if m}
    return dict(
        img_size=img_size or side * patch * vae_stride, vae_stride=vae_stride, patch_size=patch,
        encoder_embed_dim=int(d), encoder_depth=depths["encoder"], encoder_num_heads=heads,
        decoder_embed_dim=int(dd), decoder_depth=depths["decoder"], decoder_num_heads=dec_heads,
        mlp_ratio=np.shape(sd["encoder_blocks.0.mlp.fc1.weight"])[0] / d, vae_embed_dim=vae_embed_dim,
        class_num=int(np.shape(sd["class_emb.weight"])[0]), buffer_size=int(total - seq_len),
        diffloss_d=(max(res_idx) + 1) if res_idx else 0,
        diffloss_w=int(np.shape(sd["diffloss.net.input_proj.weight"])[0]) if "diffloss.net.input_proj.weight" in sd else 0,
    )
