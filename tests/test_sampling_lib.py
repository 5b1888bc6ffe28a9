"""The shared decoding pieces (jaxgen/sampling): CFG rules and schedules, mask-ratio functions, the decode loop."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.sampling import guidance, schedules
from jaxgen.sampling.filtering import sample_tokens, step_noise
from jaxgen.sampling.loop import decode_loop


def test_noise_drawn_ahead_makes_the_per_step_keys_draws():
    """`step_noise` for steps t is the Gumbel noise of the keys fold_in(rng, t): with it `sample_tokens` draws the
    tokens it draws from those keys (temperature and top-k / top-p applied the same way)."""
    rng = jax.random.PRNGKey(3)
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (6, 2, 64))
    steps = jnp.arange(4, 10)
    noise = jax.jit(lambda r: step_noise(r, steps, (2, 64)))(rng)
    assert noise.shape == (6, 2, 64)
    drawn = []
    for i, t in enumerate(range(4, 10)):
        for kw in ({"temperature": 1.3}, {"top_k": 5, "top_p": 0.8}):
            want = sample_tokens(jax.random.fold_in(rng, t), logits[i], **kw)[1]
            np.testing.assert_array_equal(sample_tokens(None, logits[i], noise=noise[i], **kw)[1], want)
            drawn.append(np.asarray(want))
    assert len({d.tobytes() for d in drawn}) > 3  # the draws vary with the step


def test_mix_is_the_cfg_rule_of_every_family():
    c, u = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.0])
    np.testing.assert_allclose(guidance.mix(c, u, 1.0), c)  # scale 1: the conditional prediction
    np.testing.assert_allclose(guidance.mix(c, u, 0.0), u)
    t = 0.7  # VAR's (1 + t) c - t u is the mix with scale 1 + t
    np.testing.assert_allclose(guidance.mix(c, u, 1 + t), (1 + t) * c - t * u, rtol=1e-6)
    np.testing.assert_allclose(guidance.mix_halves(jnp.stack([c, u]), 3.0), guidance.mix(c, u, 3.0)[None])


def test_schedules_of_the_guidance_scale():
    np.testing.assert_allclose(guidance.var_scales(4, 1.5), [1.0, 1.5, 2.0, 2.5])  # t = cfg * si / (S - 1)
    np.testing.assert_allclose(guidance.mar_scales([12, 4, 1], 16, 3.0, "linear"), [1.5, 2.5, 2.875])
    g, p = 16.0, 2.75  # RAR-B: 1 at the first token, g at the last
    assert float(guidance.power_cosine_scale(0, 256, g, p)) == pytest.approx(1.0)
    assert float(guidance.power_cosine_scale(256, 256, g, p)) == pytest.approx(g)
    assert float(guidance.power_cosine_scale(100, 256, g, 0.0)) == pytest.approx(g)  # pow 0: constant


def test_mask_ratio_functions():
    r = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(schedules.mask_ratio("cosine", r), np.cos(np.pi / 2 * np.asarray(r)), atol=1e-6)
    np.testing.assert_allclose(schedules.mask_ratio("linear", r), 1 - np.asarray(r), atol=1e-6)
    np.testing.assert_allclose(schedules.mask_ratio("pow2", r), 1 - np.asarray(r) ** 2, atol=1e-6)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        schedules.mask_ratio("zigzag", r)


def test_decode_loop_traces_one_step_and_reads_its_table_row():
    traces = []

    def step(k, state, row):
        traces.append(k)
        return state + row["add"] * (k + 1)

    table = {"add": np.array([1.0, 10.0, 100.0], np.float32)}
    out = jax.jit(lambda s: decode_loop(step, s, 3, table))(jnp.zeros(()))
    assert float(out) == 1 * 1 + 10 * 2 + 100 * 3 and len(traces) == 1


def test_precompiled_sampler_is_what_generate_runs(monkeypatch):
    """`Sampler.precompile` from abstract params (before any weights exist, as sample / eval do) compiles the
    program `generate` then runs: no second compilation. Memory is handed back after compiling and once after the
    first batch, never by a sampler made with hand_back_memory=False (training's periodic grids)."""
    from jax import monitoring

    from jaxgen import families, pipeline, sampling

    generate_lib = sys.modules["jaxgen.sampling.generate"]  # the package re-exports a function of that name
    hand_backs = []
    monkeypatch.setattr(generate_lib, "release_free_memory", lambda: hand_backs.append(1))
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import sharding as sh
    from jaxgen.train import restore
    from configs import rar_tiny

    config = rar_tiny.get_config()
    family = families.build(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    compiles, listening = [], [True]
    monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if listening[0] and "backend_compile" in event else None)
    sampler = sampling.Sampler(family, mesh, config.mesh.rules)
    sampler.precompile(restore.abstract_params(family, mesh, config.mesh.rules), pipeline.abstract_frozen(family, mesh),
                       4)
    assert compiles, "precompile compiled nothing"
    assert len(hand_backs) == 1
    params, _ = sh.sharded_init(lambda: family.init(jax.random.PRNGKey(0)), mesh, sh.rules_tuple(config.mesh.rules))
    frozen = {"tokenizer": restore.replicate(sh.unbox(jax.jit(family.tokenizer.init)(jax.random.PRNGKey(1))), mesh)}
    compiles.clear()
    images = sampling.Sampler(family, mesh, config.mesh.rules).generate(params, frozen, np.arange(8) % 10, 0, 4,
                                                                        progress=False)
    listening[0] = False
    assert images.shape[0] == 8
    assert not compiles, compiles
    assert len(hand_backs) == 2  # once for two batches
    sampling.Sampler(family, mesh, config.mesh.rules, hand_back_memory=False).generate(
        params, frozen, np.arange(4) % 10, 0, 4, progress=False)
    assert len(hand_backs) == 2
