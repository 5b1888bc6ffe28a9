"""RAR module unit tests (tiny sizes, random weights): KV-cached decoding vs the full causal forward, token orders,
class dropout, and the converter's error messages."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError

from jaxgen.convert.rar import convert_rar, expected_rar_keys
from jaxgen.families.rar.model import RAR, init_params, rar_from_fields, sample_orders, shuffle_tokens

TINY = dict(hidden_size=32, depth=2, num_heads=4, mlp_dim=48, codebook_size=16, num_classes=5, image_seq_len=9,
            dropout=0.0, attn_dropout=0.0)
B = 3


def _randomize(params, seed=0):
    """Random O(1) weights everywhere: the official zero init of adaLN would turn every block into the identity."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [jax.random.normal(k, x.shape) / np.sqrt(x.shape[0] if x.ndim == 2 else 4.0) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(tree, new)


@pytest.fixture(scope="module")
def tiny():
    model = RAR(**TINY)
    params = _randomize(nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, model.codebook_size, (B, model.image_seq_len)), jnp.int32)
    labels = jnp.asarray([1, 4, model.null_label], jnp.int32)
    return model, {"params": params}, tokens, labels


def test_kv_cache_decode_in_fori_loop_matches_full_forward(tiny):
    model, variables, tokens, labels = tiny
    seq = model.image_seq_len

    @jax.jit
    def decode_all(v, tokens, labels):
        first, cache = model.apply(v, labels, model.init_cache(tokens.shape[0]), method=RAR.prefill)
        out = jnp.zeros((tokens.shape[0], seq + 1, model.codebook_size), jnp.float32).at[:, 0].set(first)

        def body(s, carry):
            out, cache = carry
            logits, cache = model.apply(v, tokens[:, s], s, labels, cache, method=RAR.decode_step)
            return out.at[:, s + 1].set(logits), cache

        out, _ = jax.lax.fori_loop(0, seq, body, (out, cache))  # every token, the last one (no target) too
        return out

    ref = model.apply(variables, tokens, labels, method=RAR.forward_logits)
    assert ref.shape == (B, seq + 1, model.codebook_size)
    np.testing.assert_allclose(decode_all(variables, tokens, labels), ref, atol=2e-5, rtol=1e-5)
    # raster teacher forcing = explicit raster orders
    raster = jnp.broadcast_to(jnp.arange(seq), tokens.shape)
    np.testing.assert_allclose(model.apply(variables, tokens, labels, raster), ref[:, :-1], atol=1e-5)


def test_random_order_changes_logits_and_targets(tiny):
    model, variables, tokens, labels = tiny
    orders = sample_orders(jax.random.PRNGKey(1), B, model.image_seq_len, 1.0)
    assert (np.sort(np.asarray(orders), axis=1) == np.arange(model.image_seq_len)).all()
    assert not (np.asarray(orders) == np.arange(model.image_seq_len)).all(axis=1).any()
    shuffled = model.apply(variables, tokens, labels, orders)
    raster = model.apply(variables, tokens, labels)
    assert np.abs(np.asarray(shuffled) - np.asarray(raster)).max() > 1e-2
    np.testing.assert_array_equal(shuffle_tokens(tokens, orders),
                                  np.take_along_axis(np.asarray(tokens), np.asarray(orders), 1))
    # ratio 0 -> raster rows
    np.testing.assert_array_equal(sample_orders(jax.random.PRNGKey(2), B, 5, 0.0), np.tile(np.arange(5), (B, 1)))


def test_class_drop_uses_null_id(tiny):
    _, variables, tokens, labels = tiny
    null = jnp.full_like(labels, TINY["num_classes"])
    always = RAR(**TINY, class_drop_prob=1.0)
    never = RAR(**TINY, class_drop_prob=0.0)
    rngs = {"dropout": jax.random.PRNGKey(3)}
    uncond = always.apply(variables, tokens, null)
    np.testing.assert_allclose(always.apply(variables, tokens, labels, train=True, rngs=rngs), uncond, atol=1e-6)
    np.testing.assert_allclose(never.apply(variables, tokens, labels, train=True, rngs=rngs),
                               never.apply(variables, tokens, labels), atol=1e-6)
    assert np.abs(np.asarray(never.apply(variables, tokens, labels)) - np.asarray(uncond)).max() > 1e-2
    # the null label is the table's last row
    assert int(always.apply(variables, null, method=RAR.condition_ids)[0]) == always.num_embeddings - 1


def test_remat_and_dropout_paths(tiny):
    _, variables, tokens, labels = tiny
    remat = RAR(**TINY, remat=True)
    np.testing.assert_allclose(remat.apply(variables, tokens, labels), RAR(**TINY).apply(variables, tokens, labels),
                               atol=1e-6)
    drop = RAR(**{**TINY, "dropout": 0.5, "attn_dropout": 0.5})
    a = drop.apply(variables, tokens, labels, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    assert np.isfinite(np.asarray(a)).all()
    assert np.abs(np.asarray(a) - np.asarray(drop.apply(variables, tokens, labels))).max() > 1e-3


def test_bf16_decode_close_to_forward(tiny):
    _, variables, tokens, labels = tiny
    model = RAR(**TINY, dtype=jnp.bfloat16)
    ref = model.apply(variables, tokens, labels, method=RAR.forward_logits)
    first, cache = model.apply(variables, labels, model.init_cache(B), method=RAR.prefill)
    assert cache[0].k.dtype == jnp.bfloat16
    second, _ = jax.jit(lambda v, c: model.apply(v, tokens[:, 0], 0, labels, c, method=RAR.decode_step))(variables,
                                                                                                          cache)
    scale = float(np.abs(np.asarray(ref)).max())
    assert np.abs(np.asarray(first) - np.asarray(ref[:, 0])).max() < 0.05 * scale
    assert np.abs(np.asarray(second) - np.asarray(ref[:, 1])).max() < 0.05 * scale


def _torch_state_dict(model, params):
    """Invert the converter's layout (kernel (in, out) -> weight (out, in))."""
    p = jax.tree_util.tree_map(np.asarray, params)
    sd = {k: p[k] for k in ("cls_token", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings")}
    sd["embeddings.weight"] = p["embeddings"]["embedding"]

    def put(prefix, node):
        if "kernel" in node:
            sd[prefix + ".weight"] = node["kernel"].T
        else:
            sd[prefix + ".weight"] = node["scale"]
        sd[prefix + ".bias"] = node["bias"]

    for i in range(model.depth):
        blk = p[f"blocks_{i}"]
        for name in ("norm1", "norm2", "adaLN_modulation"):
            put(f"blocks.{i}.{name}" + (".1" if name == "adaLN_modulation" else ""), blk[name])
        for name in ("qkv", "q_norm", "k_norm", "proj"):
            put(f"blocks.{i}.attn.{name}", blk["attn"][name])
        for name in ("fc1", "fc2"):
            put(f"blocks.{i}.mlp.{name}", blk["mlp"][name])
    put("adaln_before_head.adaLN_modulation.1", p["adaln_before_head"]["adaLN_modulation"])
    put("lm_head", p["lm_head"])
    return sd


def test_converter_roundtrip_and_errors(tiny):
    model, variables, tokens, labels = tiny
    sd = _torch_state_dict(model, variables["params"])
    assert sorted(sd) == sorted(expected_rar_keys(model.depth))
    params = convert_rar(sd)  # architecture read from the shapes
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.tree_util.tree_map(np.asarray,
                                                                                          variables["params"]))
    convert_rar({**sd, "attn_mask": np.zeros((3, 3), np.float32)}, TINY)  # non-persistent buffer is skipped
    broken = dict(sd)
    del broken["blocks.1.attn.q_norm.bias"]
    with pytest.raises(ValueError, match=r"missing 'blocks\.1\.attn\.q_norm\.bias'"):
        convert_rar(broken)
    with pytest.raises(ValueError, match="unexpected"):
        convert_rar({**sd, "extra.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="mlp"):
        convert_rar(sd, {**TINY, "mlp_dim": 64})  # shape check against the module
    with pytest.raises(ConfigError, match="mlp_ratio"):
        rar_from_fields({**TINY, "mlp_ratio": 4.0})
    assert rar_from_fields({**TINY, "dtype": "bfloat16"}).dtype == jnp.bfloat16
