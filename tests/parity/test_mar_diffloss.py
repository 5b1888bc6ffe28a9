"""DiffLoss training objective and its gradients against the official code (fixture kind 'mar_diffloss', README B2).

`create_diffusion("", "cosine").training_losses(net, x_start, t, dict(c=c), noise=noise)` per row (loss = mse + vb,
the VLB through a stop-gradient on eps, the decoder NLL at t = 0), the masked mean of `DiffLoss.forward`
(`jaxgen.diffusion.diffloss.diffloss_loss` with t and noise injected), and the gradients of that masked loss with
respect to c and to the denoiser parameters the fixture names (`grad_<torch name>`, torch layout), mapped onto
jaxgen's params through the converter itself.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.diffloss import convert_simple_mlp_adaln
from jaxgen.diffusion.diffloss import diffloss_loss
from jaxgen.diffusion.gaussian import create_diffusion
from tests.parity.denoiser import PREFIX, build_denoiser, denoiser_weights
from tests.parity.fixtures import assert_close, parametrize_fixtures, require

ATOL = RTOL = 1e-4
# README B2: rows at large t are ~1e3 in magnitude; gradients and per-row terms are compared relative to the
# array's max magnitude.
REL_TO_MAX = 1e-4


def _diffusion(meta):
    call = str((meta.get("official") or {}).get("calls", {}).get("loss, mse, vb", ""))
    kw = {}
    for name in ("timestep_respacing", "noise_schedule"):
        found = re.search(name + r"\s*=\s*[\"']([^\"']*)[\"']", call)
        if found:
            kw[name] = found.group(1)
    return create_diffusion(**{"timestep_respacing": "", "noise_schedule": "cosine", **kw})


def _torch_to_ours(sd, torch_key):
    """(path in our params, transposed?) for a torch `diffloss.net.*` key, found by perturbing that one entry and
    seeing which converted leaf changes (the converter is the single source of the name / layout map)."""
    base = convert_simple_mlp_adaln(sd, PREFIX)
    marked = np.asarray(sd[torch_key], np.float32) + np.random.default_rng(0).standard_normal(
        sd[torch_key].shape).astype(np.float32)
    moved = convert_simple_mlp_adaln(dict(sd, **{torch_key: marked}), PREFIX)
    hits = []
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                                 jax.tree_util.tree_flatten_with_path(moved)[0]):
        if not np.array_equal(a, b):
            hits.append((path, b))
    assert len(hits) == 1, f"{torch_key} maps to {len(hits)} converted leaves"
    path, leaf = hits[0]
    if leaf.shape == marked.shape and np.array_equal(leaf, marked):
        return path, False
    assert leaf.shape == marked.T.shape and np.array_equal(leaf, marked.T), f"{torch_key}: layout not a transpose"
    return path, True


def _get(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", k))]
    return tree


@pytest.mark.parity
@parametrize_fixtures("mar_diffloss")
def test_mar_diffloss_parity(fixture):
    fx = require(fixture)
    io, meta = fx.io, fx.meta
    sd = denoiser_weights(fx, x_dim=io["x_start"].shape[-1], c_dim=io["c"].shape[-1])
    module, params = build_denoiser(sd, meta.get("denoiser_kwargs"))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    diffusion = _diffusion(meta)
    x0, noise, c, mask = (jnp.asarray(io[k]) for k in ("x_start", "noise", "c", "mask"))
    t = jnp.asarray(io["t"]).astype(jnp.int32)
    results = {}

    def report(name, ours, ref, **tol):
        results[name] = assert_close(name, ours, ref, **(tol or dict(atol=ATOL, rtol=RTOL)))

    def net_of(p):
        return lambda x, ts, z: module.apply({"params": p}, x, ts, z)

    terms = jax.jit(lambda p, cc: diffusion.training_losses(lambda x, ts: net_of(p)(x, ts, cc), x0, t, noise))(
        params, c)
    for name in ("loss", "mse", "vb"):
        if name in io:
            report(name, terms[name], io[name], rel_to_max=REL_TO_MAX)
            report(f"{name}[t<999 rows, elementwise]", terms[name][io["t"] < diffusion.num_timesteps - 1],
                   io[name][io["t"] < diffusion.num_timesteps - 1], atol=1e-3, rtol=1e-4)

    def masked_loss(p, cc):
        return diffloss_loss(net_of(p), x0, cc, mask, None, diffusion, t=t, noise=noise)

    value, (g_params, g_c) = jax.jit(jax.value_and_grad(masked_loss, argnums=(0, 1)))(params, c)
    report("masked_loss", value, io["masked_loss"])
    report("grad_c", g_c, io["grad_c"], rel_to_max=REL_TO_MAX)
    for key in [k for k in io if k.startswith("grad_") and k != "grad_c"]:
        torch_key = PREFIX + key[len("grad_"):]
        assert torch_key in sd, f"{key}: no parameter {torch_key} in the weights"
        path, transposed = _torch_to_ours(sd, torch_key)
        g = np.asarray(_get(g_params, path))
        report(key, g.T if transposed else g, io[key], rel_to_max=REL_TO_MAX)

    outputs = [k for k in meta["arrays"] if k not in ("x_start", "noise", "t", "c", "mask")]
    not_compared = [k for k in outputs if k not in results]
    assert not not_compared, f"fixture outputs not compared: {not_compared}"
    for name, (max_diff, rel) in results.items():
        print(f"{fx.name} {name}: max|diff| {max_diff:.3e}  max|diff|/max|ref| {rel:.3e}")
