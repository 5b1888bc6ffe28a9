"""MAR transformer parity against the official LTH14/mar module (fixture kind 'mar', README section A).

The official encoder drops masked tokens; jaxgen keeps static shapes (full length with masked keys excluded, or a
fixed-size gather with `num_keep`). Encoder outputs are compared on the visible rows, which is exactly what the
official returns; the decoder and everything after are full length in both.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.mar import convert_mar
from jaxgen import strict
from jaxgen.families.mar.model import MAR
from jaxgen.nn.diffusion_head import timestep_embedding
from jaxgen.nn.transformer import Block
from tests.parity.fixtures import assert_close, parametrize_fixtures, require

ATOL = RTOL = 1e-4  # README: encoder/decoder/logit outputs


def _model_config(meta):
    kw = dict(meta["constructor_kwargs"])
    norm_layer = str(kw.pop("norm_layer", ""))
    found = re.search(r"eps\s*=\s*([0-9.eE+-]+)", norm_layer)
    kw["norm_eps"] = float(found.group(1)) if found else 1e-5  # torch LayerNorm default (MAR's own default)
    # Official constructor arguments that jaxgen keeps outside the module: the sampler's DDPM respacing
    # (config.sample.num_sampling_steps) and gradient checkpointing (config.remat).
    for elsewhere in ("num_sampling_steps", "grad_checkpointing"):
        kw.pop(elsewhere, None)
    return strict.check_keys(MAR, kw, "the fixture's MAR constructor kwargs")


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _visible_rows(full, mask, buffer_size):
    """(B, buffer+L, D) -> (B, n_visible, D) in position order: what the official token-dropping encoder returns."""
    keep = np.concatenate([np.ones((mask.shape[0], buffer_size), bool), np.asarray(mask) == 0], axis=1)
    full = np.asarray(full)
    return full[keep].reshape(full.shape[0], -1, full.shape[-1])


def _block_outputs(state, stack):
    inter = state["intermediates"][stack]
    names = sorted((k for k in inter if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    return [inter[k]["__call__"][0] for k in names]


def _report(results, name, ours, ref, **tol):
    kw = tol or dict(atol=ATOL, rtol=RTOL)
    max_diff, rel = assert_close(name, ours, ref, **kw)
    results[name] = (max_diff, rel)


@pytest.mark.parity
@parametrize_fixtures("mar")
def test_mar_parity(fixture):
    fx = require(fixture)
    io, sd = fx.io, fx.weights
    cfg = _model_config(fx.meta)
    model = MAR(**cfg)
    params = convert_mar(sd, cfg)  # checks every key and shape against the model
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    results = {}
    b = io["x_latent"].shape[0]
    buf = model.buffer_size
    mask = io["mask"]

    def run(method, *args, **kw):
        return model.apply(variables, *args, method=method, **kw)

    # tokens <-> latents
    tokens = run(MAR.patchify, jnp.asarray(_nhwc(io["x_latent"])))
    _report(results, "patchify", tokens, io["patchify"])
    _report(results, "unpatchify", _nchw(run(MAR.unpatchify, jnp.asarray(io["patchify"]))), io["unpatchify"])

    class_emb = run(MAR.class_embedding, jnp.asarray(io["labels"]))
    _report(results, "class_embedding", class_emb, io["class_embedding"])

    capture = dict(capture_intermediates=lambda mdl, _: isinstance(mdl, Block), mutable=["intermediates"])
    tok_ref, ce_ref = jnp.asarray(io["patchify"]), jnp.asarray(io["class_embedding"])

    # encoder: full length with masked keys excluded (default) -> compare visible rows, incl. every block
    enc, state = run(MAR.forward_mae_encoder, tok_ref, jnp.asarray(mask), ce_ref, **capture)
    for i, out in enumerate(_block_outputs(state, "encoder_blocks")):
        _report(results, f"encoder_block{i}_out", _visible_rows(out, mask, buf), io[f"encoder_block{i}_out"])
    _report(results, "encoder_out", _visible_rows(enc, mask, buf), io["encoder_out"])

    # encoder with a fixed-size gather: exactly as many slots as visible tokens, and with padding slots
    n_visible = int((mask[0] == 0).sum())
    for keep in sorted({n_visible, min(n_visible + 3, model.seq_len - 1)}):
        enc_k = run(MAR.forward_mae_encoder, tok_ref, jnp.asarray(mask), ce_ref, num_keep=keep)
        _report(results, f"encoder_out[num_keep={keep}]", _visible_rows(enc_k, mask, buf), io["encoder_out"])

    # decoder from the official encoder output (scattered back to full length), incl. every block
    enc_full = np.zeros((b, buf + model.seq_len, io["encoder_out"].shape[-1]), np.float32)
    keep_rows = np.concatenate([np.ones((b, buf), bool), mask == 0], axis=1)
    enc_full[keep_rows] = io["encoder_out"].reshape(-1, enc_full.shape[-1])
    dec, state = run(MAR.forward_mae_decoder, jnp.asarray(enc_full), jnp.asarray(mask), **capture)
    for i, out in enumerate(_block_outputs(state, "decoder_blocks")):
        _report(results, f"decoder_block{i}_out", out, io[f"decoder_block{i}_out"])
    _report(results, "decoder_out", dec, io["decoder_out"])

    # end to end (class embedding -> encoder -> decoder), eval mode
    z = run(MAR.__call__, tokens, jnp.asarray(io["labels"]), jnp.asarray(mask))
    _report(results, "decoder_out[__call__]", z, io["decoder_out"])

    # unconditional path (fake_latent as the class embedding)
    null = run(MAR.null_embedding, b)
    enc_u = run(MAR.forward_mae_encoder, tok_ref, jnp.asarray(mask), null)
    _report(results, "encoder_out_uncond", _visible_rows(enc_u, mask, buf), io["encoder_out_uncond"])
    _report(results, "decoder_out_uncond", run(MAR.forward_mae_decoder, enc_u, jnp.asarray(mask)),
            io["decoder_out_uncond"])

    # sampling step 0: tokens zero, everything masked (only the buffer is visible)
    all_masked = np.ones_like(mask)
    enc_a = run(MAR.forward_mae_encoder, jnp.zeros_like(tok_ref), jnp.asarray(all_masked), ce_ref)
    _report(results, "encoder_out_allmasked", _visible_rows(enc_a, all_masked, buf), io["encoder_out_allmasked"])
    _report(results, "decoder_out_allmasked", run(MAR.forward_mae_decoder, enc_a, jnp.asarray(all_masked)),
            io["decoder_out_allmasked"])

    # diffusion head through the MAR module (converted diffloss.net.* weights)
    x_t, t, c = (jnp.asarray(io[k]) for k in ("dl_x_t", "dl_t", "dl_c"))
    _report(results, "dl_net_out", run(MAR.denoise, x_t, t, c), io["dl_net_out"])
    _report(results, "dl_net_out_with_cfg",
            run(MAR.denoise_with_cfg, x_t, t, c, jnp.asarray(io["dl_cfg_scale"])), io["dl_net_out_with_cfg"])
    _report(results, "dl_timestep_embedding_freq", timestep_embedding(t, 256), io["dl_timestep_embedding_freq"])

    outputs = [k for k, v in fx.meta["arrays"].items() if v.get("role") == "output"]
    not_compared = [k for k in outputs if k not in results]
    assert not not_compared, f"fixture outputs not compared: {not_compared}"
    for name, (max_diff, rel) in results.items():
        print(f"{fx.name} {name}: max|diff| {max_diff:.3e}  max|diff|/max|ref| {rel:.3e}")


@pytest.mark.parity
@parametrize_fixtures("mar")
def test_convert_mar_rejects_bad_state_dicts(fixture):
    fx = require(fixture)
    cfg = _model_config(fx.meta)
    sd = dict(fx.weights)
    depth = cfg["encoder_depth"]
    extra = dict(sd, **{f"encoder_blocks.{depth}.norm1.weight": sd["encoder_blocks.0.norm1.weight"]})
    with pytest.raises(ValueError, match=f"unexpected.*encoder_blocks.{depth}.norm1.weight"):
        convert_mar(extra, cfg)
    with pytest.raises(ValueError, match="missing.*mask_token"):
        convert_mar({k: v for k, v in sd.items() if k != "mask_token"}, cfg)
    with pytest.raises(ValueError, match="mask_token"):
        convert_mar(dict(sd, mask_token=np.zeros((1, 1, 3), np.float32)), cfg)
    with pytest.raises(ValueError, match="bogus"):
        convert_mar(dict(sd, **{"diffloss.net.bogus.weight": np.zeros((2, 2), np.float32)}), cfg)
    with pytest.raises(ValueError, match="diffusion-head"):
        convert_mar({k: v for k, v in sd.items() if not k.startswith("diffloss.")}, cfg)
