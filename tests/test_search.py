"""Policy search: the finite-difference optimiser (AutoNAT's rules, exact resume), every generator family's
searchable knobs traced through its sampler, and the sampler compiled once for every policy value."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import families
from jaxgen.errors import ConfigError
from jaxgen.search.finite_difference import DEFAULT_GROUPS, FiniteDifferenceSearch, Group, Knob, SearchState


def _quadratic(theta):
    target = np.array([0.3, 0.6, 2.0])
    return float(np.sum((np.asarray(theta) - target) ** 2))


KNOBS = [Knob("ratios", (2,), "ratio"), Knob("temp", (), "scale")]
GROUPS = {"ratio": Group(0.01, 0.2, 0.0, 0.99), "scale": Group(0.1, 0.2, 1e-4, math.inf)}


def test_one_update_is_autonats_rule():
    fd = FiniteDifferenceSearch(KNOBS, GROUPS, momentum=0.5)
    state = fd.run(fd.initial_state({"ratios": np.array([0.9, 0.9]), "temp": np.array(1.0)}), _quadratic, 2)
    assert state.evaluations == 1 + 2 * 4  # base, then (3 perturbations + the new base) per update
    theta0 = np.array([0.9, 0.9, 1.0])
    delta = np.array([0.01, 0.01, 0.1])
    g1 = np.array([(_quadratic(theta0 + delta[i] * np.eye(3)[i]) - _quadratic(theta0)) / delta[i] for i in range(3)])
    theta1 = np.clip(theta0 - 0.2 * g1, [0, 0, 1e-4], [0.99, 0.99, np.inf])
    np.testing.assert_allclose(state.history[1]["theta"], theta1, rtol=1e-12)
    g2 = np.array([(_quadratic(theta1 + delta[i] * np.eye(3)[i]) - _quadratic(theta1)) / delta[i] for i in range(3)])
    theta2 = np.clip(theta1 - 0.2 * (0.5 * g1 + g2), [0, 0, 1e-4], [0.99, 0.99, np.inf])
    np.testing.assert_allclose(state.theta, theta2, rtol=1e-12)
    assert state.history[-1]["metric"] < state.history[0]["metric"]


def test_perturbation_clamps_and_official_defaults():
    assert DEFAULT_GROUPS["ratio"] == Group(0.01, 1e-3, 0.0, 0.99)
    assert DEFAULT_GROUPS["scale"] == Group(0.1, 0.1, 1e-4, math.inf)
    fd = FiniteDifferenceSearch(KNOBS, DEFAULT_GROUPS)
    p = fd.perturbed(np.array([0.995, 0.5, 1.0]), 0)
    assert p[0] == pytest.approx(1.0)  # official: a perturbed ratio is clamped to [0, 1]


def test_resume_after_a_kill_ends_exactly_where_an_uninterrupted_search_does():
    fd = FiniteDifferenceSearch(KNOBS, GROUPS, momentum=0.5)
    start = {"ratios": np.array([0.9, 0.2]), "temp": np.array(1.5)}
    full = fd.run(fd.initial_state(start), _quadratic, 3)

    saved = {}
    calls = {"n": 0}

    def dying(theta):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the second update
            raise KeyboardInterrupt
        return _quadratic(theta)

    with pytest.raises(KeyboardInterrupt):
        fd.run(fd.initial_state(start), dying, 3, save=lambda s: saved.update(state=json.dumps(s.to_json())))
    resumed_state = SearchState.from_json(json.loads(saved["state"]))
    assert resumed_state.pending, "the evaluations done inside the interrupted update are kept"
    count = {"n": 0}

    def counting(theta):
        count["n"] += 1
        return _quadratic(theta)

    resumed = fd.run(resumed_state, counting, 3)
    assert resumed.theta == full.theta and resumed.history == full.history
    assert count["n"] == full.evaluations - 6, "nothing evaluated twice"


def _traced_policy(fam):
    space = fam.search_space()
    assert space and set(space.values()) <= {"ratio", "scale"}
    values = {k: np.asarray(getattr(fam.sample_settings, k), np.float32) for k in space}
    return values


@pytest.mark.parametrize("name", ["nat", "rar", "var", "mar"])
def test_every_generator_family_traces_its_knobs(name):
    config = config_lib.load(families.tiny_config_name(name))
    fam = families.build(config)
    values = _traced_policy(fam)
    params = jax.eval_shape(lambda: jax.tree_util.tree_map(lambda x: x, fam.init(jax.random.PRNGKey(0))))
    from jaxgen.parallel.sharding import unbox

    params = unbox(params)
    frozen = {"tokenizer": unbox(jax.eval_shape(fam.tokenizer.init, jax.random.PRNGKey(1)))}
    labels = jnp.zeros((2,), jnp.int32)
    out = jax.eval_shape(fam.sample_with_policy, params, frozen, labels, jax.random.PRNGKey(0),
                         {k: jnp.asarray(v) for k, v in values.items()})
    assert out.shape == (2,) + fam.image_shape()


@pytest.mark.parametrize("name", ["nat", "rar"])
def test_policy_sampling_equals_config_sampling_and_compiles_once(name):
    config = config_lib.load(families.tiny_config_name(name))
    fam = families.build(config)
    from jaxgen.parallel.sharding import unbox

    params = unbox(jax.jit(fam.init)(jax.random.PRNGKey(0)))
    frozen = {"tokenizer": unbox(jax.jit(fam.tokenizer.init)(jax.random.PRNGKey(1)))}
    labels = jnp.arange(4, dtype=jnp.int32)
    values = _traced_policy(fam)
    traces = []

    def with_policy(p, f, l, r, v):
        traces.append(1)
        return fam.sample_with_policy(p, f, l, r, v)

    run = jax.jit(with_policy)
    rng = jax.random.PRNGKey(3)
    a = np.asarray(run(params, frozen, labels, rng, {k: jnp.asarray(v) for k, v in values.items()}))
    ref = np.asarray(jax.jit(fam.sample)(params, frozen, labels, rng))
    np.testing.assert_allclose(a, ref, atol=1e-5)
    run(params, frozen, labels, rng, {k: jnp.asarray(v * 1.5) for k, v in values.items()})
    assert len(traces) == 1


def test_search_config_errors_are_one_line():
    from jaxgen.search import runner

    config = config_lib.load("nat_tiny:runlocal")
    config.search.knobs = ("nope",)
    with pytest.raises(ConfigError, match="config.search.knobs.*nope.*not searchable"):
        runner.check(config, families.build(config))
    config = config_lib.load("nat_tiny:runlocal")
    config.search.metric = "kid"
    with pytest.raises(ConfigError, match="unknown config.search.metric 'kid'.*fid"):
        runner.check(config, families.build(config))
    config = config_lib.load("nat_tiny:runlocal")
    config.search.metric = "fid"  # FID needs the Inception weights and reference statistics of config.eval
    with pytest.raises(ConfigError, match="config.eval.inception_weights=''.*pt_inception"):
        runner.check(config, families.build(config))


def test_greedy_line_search_walks_one_parameter_at_a_time():
    from jaxgen.search.beta_line_search import greedy_line_search

    seen = []

    def f(a, b):
        seen.append((a, b))
        return (a - 9.0) ** 2 + (b - 5.0) ** 2

    best, value = greedy_line_search(f, (12.0, 3.0), 1.0, 2)
    assert best == (9.0, 5.0) and value == 0.0
    assert seen[:5] == [(12.0, 3.0), (13.0, 3.0), (11.0, 3.0), (10.0, 3.0), (9.0, 3.0)]


def test_beta_search_needs_a_beta_nat_config():
    from jaxgen.search import runner

    config = config_lib.load("rar_tiny:runlocal")
    config.search.target = "beta"
    with pytest.raises(ConfigError, match="Beta"):
        runner.check(config, families.build(config))
