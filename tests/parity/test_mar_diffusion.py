"""Gaussian diffusion of MAR's DiffLoss and MAR's mask schedule against the official code (fixture kind
'mar_diffusion', README section B).

For every diffusion `d` the fixture describes (`constructor_kwargs`: name -> the official `create_diffusion(...)`
call): the float64 process tables (1e-12 relative), `timestep_map` (exact), `q_sample`, `p_mean_variance` with a
given model output and with the tiny denoiser, one `p_sample` with the recorded noise (1e-4), and the full DiffLoss
samplers `sample_<name>_out` with the recorded initial / per-step noise injected (relative to max 1e-4). Schedules:
`mar_mask_schedule(seq_len, num_iter)` exactly.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.diffusion.diffloss import (EmbeddedDenoiser, diffloss_sample, modulation_bytes_per_step,
                                       modulation_chunk)
from jaxgen.diffusion.gaussian import _TABLES, create_diffusion
from jaxgen.sampling.schedules import mar_mask_schedule
from jaxgen.nn.diffusion_head import SimpleMLPAdaLN
from tests.parity.denoiser import build_denoiser, denoiser_weights
from tests.parity.fixtures import assert_close, assert_equal_int, parametrize_fixtures, require

ATOL = RTOL = 1e-4          # README: float32 outputs
TABLE_RTOL = 1e-12          # README: float64 schedule arrays
SAMPLE_REL_TO_MAX = 1e-4    # README: 100-step DiffLoss samples


def _diffusion_kwargs(call: str) -> dict:
    """`create_diffusion(timestep_respacing="100", noise_schedule="cosine")  (...)` -> kwargs."""
    kw = {}
    for name in ("timestep_respacing", "noise_schedule"):
        found = re.search(name + r"\s*=\s*[\"']([^\"']*)[\"']", call)
        if found:
            kw[name] = found.group(1)
    steps = re.search(r"diffusion_steps\s*=\s*(\d+)", call)
    if steps:
        kw["num_timesteps"] = int(steps.group(1))
    return kw


def _diffusions(meta):
    out = {name: create_diffusion(**_diffusion_kwargs(call)) for name, call in meta["constructor_kwargs"].items()}
    assert out, "fixture describes no diffusion"
    return out


def _sample_prefixes(io):
    return sorted({m.group(1) for k in io if (m := re.match(r"(sample_\w+?)_out$", k))})


class _Results(dict):
    def close(self, name, ours, ref, **tol):
        self[name] = assert_close(name, ours, ref, **(tol or dict(atol=ATOL, rtol=RTOL)))

    def equal(self, name, ours, ref):
        assert_equal_int(name, ours, ref)
        self[name] = (0.0, 0.0)


def _check_tables(res, io, name, d):
    tables = d.tables()
    for key in [k for k in io if k.startswith(name + "_")]:
        table = key[len(name) + 1:]
        if table == "timestep_map":
            res.equal(key, d.timestep_map, io[key])
        elif table in tables and table in _TABLES:
            ref = io[key]
            assert ref.dtype == np.float64, f"{key}: expected a float64 table, got {ref.dtype}"
            ours = tables[table]
            assert ours.dtype == np.float64 and ours.shape == ref.shape, (key, ours.dtype, ours.shape, ref.shape)
            np.testing.assert_allclose(ours, ref, rtol=TABLE_RTOL, atol=0, err_msg=key)
            diff = float(np.abs(ours - ref).max())
            res[key] = (diff, diff / float(np.abs(ref).max()))


@pytest.mark.parity
@parametrize_fixtures("mar_diffusion")
def test_mar_diffusion_parity(fixture):
    fx = require(fixture)
    io, meta = fx.io, fx.meta
    res = _Results()
    diffusions = _diffusions(meta)
    temperature = float(io["psample_temperature"]) if "psample_temperature" in io else 1.0

    c_key = next((f"{n}_pmv_c" for n in diffusions if f"{n}_pmv_c" in io), None)
    x_key = next((f"{n}_pmv_x_t" for n in diffusions if f"{n}_pmv_x_t" in io), None)
    sd = denoiser_weights(fx, x_dim=io[x_key].shape[-1] if x_key else None,
                          c_dim=io[c_key].shape[-1] if c_key else None)
    module, params = build_denoiser(sd)
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}

    @jax.jit
    def net(x, t, c):
        return module.apply(variables, x, t, c)

    @jax.jit
    def net_cfg(x, t, c, scale):
        return module.apply(variables, x, t, c, scale, method=SimpleMLPAdaLN.forward_with_cfg)

    for name, d in diffusions.items():
        _check_tables(res, io, name, d)
        g = lambda k: jnp.asarray(io[f"{name}_{k}"])  # noqa: E731
        if f"{name}_q_sample" in io:
            res.close(f"{name}_q_sample", d.q_sample(g("q_x0"), g("q_t").astype(jnp.int32), g("q_noise")),
                      io[f"{name}_q_sample"])
        if f"{name}_pmv_x_t" not in io:
            continue
        x_t, t = g("pmv_x_t"), g("pmv_t").astype(jnp.int32)
        given = d.p_mean_variance(g("pmv_model_output"), x_t, t)
        for part, val in given.items():
            if f"{name}_pmv_given_{part}" in io:
                res.close(f"{name}_pmv_given_{part}", val, io[f"{name}_pmv_given_{part}"])
        # The official SpacedDiffusion wrapper maps respaced t through timestep_map before calling the net.
        out = net(x_t, d.original_timesteps(t), g("pmv_c"))
        for part, val in d.p_mean_variance(out, x_t, t).items():
            if f"{name}_pmv_net_{part}" in io:
                res.close(f"{name}_pmv_net_{part}", val, io[f"{name}_pmv_net_{part}"])
        if f"{name}_psample_sample" in io:
            ps = d.p_sample(out, x_t, t, g("psample_noise"), temperature)
            res.close(f"{name}_psample_sample", ps["sample"], io[f"{name}_psample_sample"])
            res.close(f"{name}_psample_pred_xstart", ps["pred_xstart"], io[f"{name}_psample_pred_xstart"])

    # Full DiffLoss.sample (the respaced sampling diffusion) with the recorded noise.
    prefixes = _sample_prefixes(io)
    if prefixes:
        gen = [d for d in diffusions.values() if d.num_timesteps == io[prefixes[0] + "_noise_steps"].shape[0]]
        gen = gen[-1] if gen else diffusions.get("gen")
        assert gen is not None, "no diffusion with as many steps as the recorded sampler noise"
    for p in prefixes:
        cfg = float(io[p + "_cfg"])
        z = jnp.asarray(io[p + "_z"])
        guided = cfg != 1.0
        fn = (lambda x, t, c, s: net_cfg(x, t, c, s)) if guided else net
        # The sampler's form: condition and timesteps embedded once per call, not at every DDPM step.
        embedded = EmbeddedDenoiser(
            time=lambda t: module.apply(variables, t, method=SimpleMLPAdaLN.embed_time),
            condition=lambda c: module.apply(variables, c, method=SimpleMLPAdaLN.embed_condition),
            body=(lambda x, y, s: module.apply(variables, x, y, s, method=SimpleMLPAdaLN.forward_embedded_with_cfg))
            if guided else (lambda x, y: module.apply(variables, x, y, method=SimpleMLPAdaLN.forward_embedded)))
        # MAR's sampler: the adaLN modulations of several DDPM steps in one batch (all steps, a proper divisor of
        # them, one at a time), the scan then going over chunks of steps.
        modulated = EmbeddedDenoiser(
            time=embedded.time, condition=embedded.condition,
            body=(lambda x, m, s: module.apply(variables, x, m, s, method=SimpleMLPAdaLN.forward_modulated_with_cfg))
            if guided else (lambda x, m: module.apply(variables, x, m, method=SimpleMLPAdaLN.forward_modulated)),
            modulate=lambda y: module.apply(variables, y, method=SimpleMLPAdaLN.modulations))
        steps = gen.num_timesteps
        cond = jnp.zeros((z.shape[0], module.model_channels), jnp.float32)
        per_step = modulation_bytes_per_step(modulated, cond)
        divisor = min((d for d in range(2, steps) if steps % d == 0), default=1)
        forms = [("", fn, None, None), ("_embedded", embedded, None, None),
                 ("_modulated_all", modulated, steps * per_step, steps), ("_modulated_per_step", modulated, 0, 1),
                 (f"_modulated_{divisor}", modulated, divisor * per_step + per_step // 2, divisor)]
        for form, denoiser, budget, chunk in forms:
            if budget is not None:
                assert modulation_chunk(denoiser, cond, steps, budget) == chunk
            kw = {} if budget is None else {"modulation_bytes": budget}
            out = diffloss_sample(denoiser, z, None, gen, temperature=temperature, cfg=cfg,
                                  noise_init=jnp.asarray(io[p + "_noise_init"]),
                                  noise_steps=jnp.asarray(io[p + "_noise_steps"]), **kw)
            res.close(p + "_out" + form, out, io[p + "_out"], rel_to_max=SAMPLE_REL_TO_MAX)

    # MAR's cosine mask schedule.
    for sched in meta.get("schedules", []):
        key = sched["key_prefix"]
        mask_len, num_pred = mar_mask_schedule(int(sched["seq_len"]), int(sched["num_iter"]))
        res.equal(key + "_mask_len", mask_len, io[key + "_mask_len"])
        res.equal(key + "_num_predicted", num_pred, io[key + "_num_predicted"])

    outputs = [k for k, v in meta["arrays"].items() if v.get("role") == "output"]
    not_compared = [k for k in outputs if k not in res]
    assert not not_compared, f"fixture outputs not compared: {not_compared}"
    for name, (max_diff, rel) in res.items():
        print(f"{fx.name} {name}: max|diff| {max_diff:.3e}  max|diff|/max|ref| {rel:.3e}")

