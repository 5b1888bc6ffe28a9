"""NAT family pieces beyond the parity fixture: policies, the decoding update's invariants, the compiled sampler
(one trace for any policy values), the MaskGIT BERT backbone against a numpy reference, and the MaskGIT / MAGE
converters on synthetic checkpoints in the official layouts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.maskgit import convert_maskgit
from jaxgen.convert.maskgit_vqgan import mage_to_maskgit_keys
from jaxgen.families.nat.masking import masked_cross_entropy, token_mask
from jaxgen.families.nat.model import MaskGITTransformer, UViT, init_params
from jaxgen.families.nat.policy import AUTONAT_L_T8, cosine_start, maskgit_policy, tables_policy
from jaxgen.families.nat.sampler import generate_tokens, remask_update
from jaxgen.parallel.sharding import unbox


def test_tables_policy_appends_the_last_step_and_checks_lengths():
    p = tables_policy(8, **AUTONAT_L_T8)
    assert all(v.shape == (8,) for v in p.values())
    assert p["mask_ratio"][-1] == 0 and p["remask_temp"][-1] == 0
    np.testing.assert_allclose(p["guidance"][3], 0.9151274967591447, rtol=1e-6)
    with pytest.raises(ValueError, match="mask_ratios has 7 values; steps=4 needs 3"):
        tables_policy(4, **AUTONAT_L_T8)


def test_maskgit_policy_is_its_schedule_and_choice_temperature():
    p = maskgit_policy(8, "cosine", 4.5, 256)
    r = (np.arange(8) + 1) / 8
    np.testing.assert_allclose(p["mask_ratio"], np.clip(np.cos(np.pi / 2 * r), 1e-6, 1), atol=1e-6)
    np.testing.assert_allclose(p["remask_temp"], 4.5 * (1 - r), atol=1e-6)
    assert not p["guidance"].any() and (p["sample_temp"] == 1).all()
    for name, ref in (("log", -np.log2(r) / np.log2(256)), ("exp", 1 - 2.0 ** (-np.log2(256) * (1 - r))),
                      ("pow2", 1 - r ** 2), ("uniform", 1 - r)):
        np.testing.assert_allclose(maskgit_policy(8, name, 1.0, 256)["mask_ratio"], np.clip(ref, 1e-6, 1), atol=1e-6)


def test_cosine_start_is_autonats_search_start():
    s = cosine_start(8)
    np.testing.assert_allclose(s["mask_ratios"], np.cos(np.pi / 2 * np.arange(1, 8) / 8))
    np.testing.assert_allclose(s["remask_temps"], 1 - np.arange(7) / 8)
    np.testing.assert_allclose(s["guidance"], np.arange(1, 9) / 8)
    assert len(s["sample_temps"]) == 8


def test_remask_update_invariants():
    rng = np.random.default_rng(0)
    b, seq, v, mask_id = 3, 64, 16, 16
    ids = np.where(rng.random((b, seq)) < 0.5, mask_id, rng.integers(0, v, (b, seq)))
    ids[:, :40] = mask_id  # at least 40 masked in every row
    masked = int((ids == mask_id).sum(1).min())
    out = remask_update(jnp.asarray(ids), jnp.asarray(rng.standard_normal((b, seq, v)), jnp.float32),
                        jnp.asarray(rng.integers(0, v, (b, seq))), jnp.asarray(rng.gumbel(size=(b, seq)), jnp.float32),
                        0.3, 1.0, masked, mask_id)
    n = int(out["mask_len"])
    assert n == max(1, min(masked - 1, math.floor(seq * np.float32(0.3))))
    remask = np.asarray(out["remask"])
    assert (remask.sum(1) == n).all(), "exactly mask_len tokens re-masked per row"
    assert not (remask & (ids != mask_id)).any(), "a fixed token was re-masked"
    fixed = ids != mask_id
    assert (np.asarray(out["sampled_ids"])[fixed] == ids[fixed]).all()
    assert (np.asarray(out["ids"]) == mask_id).sum() == b * n


def _mask_lengths(ratios, seq_len):
    """The re-mask counts the decoding update chains, from a fully masked row."""
    rng = np.random.default_rng(0)
    ids, masked, out = jnp.full((1, seq_len), 8), seq_len, []
    for r in ratios:
        res = remask_update(ids, jnp.asarray(rng.standard_normal((1, seq_len, 8)), jnp.float32),
                            jnp.asarray(rng.integers(0, 8, (1, seq_len))),
                            jnp.asarray(rng.gumbel(size=(1, seq_len)), jnp.float32), r, 1.0, masked, 8)
        ids, masked = res["ids"], res["mask_len"]
        out.append(int(masked))
    return out


def test_mask_lengths_follow_the_clamp():
    assert _mask_lengths([0.85, 0.6, 0.3, 0.0], 256) == [217, 153, 76, 1]
    assert _mask_lengths([0.999, 0.999, 0.0], 4) == [3, 2, 1]


def test_sampler_compiles_once_for_any_policy_and_fills_every_token():
    model = UViT(embed_dim=32, depth=2, num_heads=2, codebook_size=16, num_classes=3, image_seq_len=16,
                 emb_dropout=0.0)
    params = unbox(init_params(model, jax.random.PRNGKey(0)))
    traces = []

    @jax.jit
    def run(policy, rng):
        traces.append(1)
        return generate_tokens(model, params, jnp.array([0, 1, 2]), rng, policy, True)

    a = {k: jnp.asarray(v) for k, v in tables_policy(4, **cosine_start(4)).items()}
    b = dict(a, guidance=a["guidance"] * 3.0, mask_ratio=a["mask_ratio"] * 0.5)
    t1 = np.asarray(run(a, jax.random.PRNGKey(1)))
    t2 = np.asarray(run(b, jax.random.PRNGKey(1)))
    assert len(traces) == 1, "a new policy value must not retrace"
    for t in (t1, t2):
        assert t.shape == (3, 16) and t.min() >= 0 and t.max() < 16
    assert not np.array_equal(t1, t2)


def test_masking_rule_and_smoothed_loss():
    rng = np.random.default_rng(1)
    ratios = jnp.array([0.001, 0.5, 1.0])
    mask = np.asarray(token_mask(ratios, jnp.asarray(rng.random((3, 32)), jnp.float32)))
    assert list(mask.sum(1)) == [1, 16, 32]
    logits = jnp.asarray(rng.standard_normal((3, 32, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 8, (3, 32)))
    loss, _ = masked_cross_entropy(logits, targets, jnp.asarray(mask), 0.1)
    logp = np.asarray(jax.nn.log_softmax(logits))
    per = 0.9 * -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0] + 0.1 * -logp.mean(-1)
    np.testing.assert_allclose(float(loss), per[mask].mean(), rtol=1e-5)


def _ln(x, g, b, eps):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * g + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_maskgit_bert_matches_a_numpy_reference():
    """Post-LN (eps 1e-12), tanh GELU, the class token first, tied head over the whole vocabulary."""
    model = MaskGITTransformer(hidden_size=16, depth=1, num_heads=2, mlp_dim=32, codebook_size=8, num_classes=3,
                               image_seq_len=4, dropout=0.0, attn_dropout=0.0)
    params = unbox(init_params(model, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(5), p.shape), params)
    ids = np.array([[1, model.mask_id, 3, model.mask_id]])
    labels = np.array([2])
    got = np.asarray(model.apply({"params": params}, ids, labels))
    P = jax.tree_util.tree_map(np.asarray, params)
    e = P["embeddings"]
    seq = np.concatenate([labels[:, None] + 8, ids], 1)
    x = e["word_embeddings"]["embedding"][seq] + e["position_embeddings"]["embedding"][:5][None]
    x = _ln(x, e["LayerNorm"]["scale"], e["LayerNorm"]["bias"], 1e-12)
    blk = P["blocks_0"]
    qkv = x @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]
    q, k, v = [qkv[..., i * 16:(i + 1) * 16].reshape(1, 5, 2, 8) for i in range(3)]
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(1, 5, 16) @ blk["attn"]["proj"]["kernel"] + blk["attn"]["proj"]["bias"]
    x = _ln(x + o, blk["norm1"]["scale"], blk["norm1"]["bias"], 1e-12)
    h = _gelu_tanh(x @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]) @ blk["mlp"]["fc2"]["kernel"]
    x = _ln(x + h + blk["mlp"]["fc2"]["bias"], blk["norm2"]["scale"], blk["norm2"]["bias"], 1e-12)
    m = P["mlm_layer"]
    h = _ln(_gelu_tanh(x @ m["fc"]["kernel"] + m["fc"]["bias"]), m["ln"]["scale"], m["ln"]["bias"], 1e-12)
    ref = (h @ e["word_embeddings"]["embedding"].T + m["bias"])[:, 1:, :8]
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


def test_maskgit_converter_round_trips_the_official_flax_layout():
    model = MaskGITTransformer(hidden_size=16, depth=2, num_heads=2, mlp_dim=32, codebook_size=8, num_classes=3,
                               image_seq_len=4)
    params = jax.tree_util.tree_map(np.asarray, unbox(init_params(model, jax.random.PRNGKey(0))))
    params = jax.tree_util.tree_map(lambda p: p + np.random.default_rng(0).standard_normal(p.shape).astype(p.dtype),
                                    params)
    sd = {"params.Embed_0.word_embeddings.embedding": params["embeddings"]["word_embeddings"]["embedding"],
          "params.Embed_0.position_embeddings.embedding": params["embeddings"]["position_embeddings"]["embedding"],
          "params.Embed_0.embeddings_ln.scale": params["embeddings"]["LayerNorm"]["scale"],
          "params.Embed_0.embeddings_ln.bias": params["embeddings"]["LayerNorm"]["bias"]}
    for i in range(2):
        blk, p = params[f"blocks_{i}"], f"params.TransformerLayer_{i}"
        att = f"{p}.Attention_0.self_attention"
        for j, n in enumerate(("query", "key", "value")):
            sd[f"{att}.{n}.kernel"] = blk["attn"]["qkv"]["kernel"][:, j * 16:(j + 1) * 16].reshape(16, 2, 8)
            sd[f"{att}.{n}.bias"] = blk["attn"]["qkv"]["bias"][j * 16:(j + 1) * 16].reshape(2, 8)
        sd[f"{att}.out.kernel"] = blk["attn"]["proj"]["kernel"].reshape(2, 8, 16)
        sd[f"{att}.out.bias"] = blk["attn"]["proj"]["bias"]
        for name, ours in (("Attention_0.attention_output_ln", "norm1"), ("Mlp_0.layer_output_ln", "norm2")):
            sd[f"{p}.{name}.scale"], sd[f"{p}.{name}.bias"] = blk[ours]["scale"], blk[ours]["bias"]
        for name, ours in (("intermediate_output", "fc1"), ("layer_output", "fc2")):
            sd[f"{p}.Mlp_0.{name}.kernel"] = blk["mlp"][ours]["kernel"]
            sd[f"{p}.Mlp_0.{name}.bias"] = blk["mlp"][ours]["bias"]
    m = params["mlm_layer"]
    sd.update({"params.MlmLayer_0.mlm_dense.kernel": m["fc"]["kernel"], "params.MlmLayer_0.mlm_dense.bias": m["fc"]["bias"],
               "params.MlmLayer_0.mlm_ln.scale": m["ln"]["scale"], "params.MlmLayer_0.mlm_ln.bias": m["ln"]["bias"],
               "params.MlmLayer_0.mlm_bias.bias": m["bias"].reshape(-1)})
    back = convert_maskgit(sd, {"codebook_size": 8, "num_heads": 2})
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    with pytest.raises(ValueError, match="unexpected"):
        convert_maskgit({**sd, "params.extra.kernel": np.zeros(1)}, {"codebook_size": 8, "num_heads": 2})


def test_mage_vqgan_names_map_onto_the_maskgit_layout():
    sd = {"encoder.mid.block_1.conv1.weight": 1, "decoder.mid.block_2.norm2.bias": 2,
          "decoder.up.3.upsample.conv.weight": 3, "quantize.embedding.weight": 4}
    assert mage_to_maskgit_keys(sd) == {"encoder.mid.0.conv1.weight": 1, "decoder.mid.1.norm2.bias": 2,
                                        "decoder.up.3.upsample_conv.weight": 3, "quantize.embedding.weight": 4}


def test_maskgit_flax_msgpack_file_converts_through_the_cli_path(tmp_path):
    """The original MaskGIT checkpoint format (flax msgpack of {'params': ...}) is read without TensorFlow."""
    from flax import serialization

    from jaxgen import config as config_lib
    from jaxgen.convert.cli import convert
    from jaxgen.train import export

    config = config_lib.load("nat_tiny:maskgit")
    from jaxgen import families

    fam = families.build(config)
    params = jax.tree_util.tree_map(np.asarray, unbox(jax.jit(fam.init)(jax.random.PRNGKey(0))))
    m = fam.model
    d, h = m.hidden_size, m.num_heads
    tree = {"Embed_0": {"word_embeddings": {"embedding": params["embeddings"]["word_embeddings"]["embedding"]},
                        "position_embeddings": {"embedding": params["embeddings"]["position_embeddings"]["embedding"]},
                        "embeddings_ln": params["embeddings"]["LayerNorm"]}}
    for i in range(m.depth):
        blk = params[f"blocks_{i}"]
        qkv, qb = blk["attn"]["qkv"]["kernel"], blk["attn"]["qkv"]["bias"]
        att = {n: {"kernel": qkv[:, j * d:(j + 1) * d].reshape(d, h, -1), "bias": qb[j * d:(j + 1) * d].reshape(h, -1)}
               for j, n in enumerate(("query", "key", "value"))}
        att["out"] = {"kernel": blk["attn"]["proj"]["kernel"].reshape(h, -1, d), "bias": blk["attn"]["proj"]["bias"]}
        tree[f"TransformerLayer_{i}"] = {
            "Attention_0": {"self_attention": att, "attention_output_ln": blk["norm1"]},
            "Mlp_0": {"intermediate_output": blk["mlp"]["fc1"], "layer_output": blk["mlp"]["fc2"],
                      "layer_output_ln": blk["norm2"]}}
    mlm = params["mlm_layer"]
    tree["MlmLayer_0"] = {"mlm_dense": mlm["fc"], "mlm_ln": mlm["ln"], "mlm_bias": {"bias": mlm["bias"].reshape(-1)}}
    path = tmp_path / "maskgit_imagenet256_checkpoint"
    path.write_bytes(serialization.msgpack_serialize({"params": tree}))
    convert("nat", config, str(path), str(tmp_path / "out"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, export.load_params(str(tmp_path / "out")), params)


def test_maskgit_recipe_trains_and_samples():
    """nat_tiny:maskgit (BERT backbone, cosine-schedule masking, MaskGIT decoding without guidance): a finite loss
    and images of the data's shape from the MaskGIT policy."""
    from jaxgen import config as config_lib
    from jaxgen import families

    config = config_lib.load("nat_tiny:maskgit,runlocal")
    fam = families.build(config)
    assert fam.backbone == "maskgit" and not fam.use_guidance and fam.search_space() == {}
    params = unbox(jax.jit(fam.init)(jax.random.PRNGKey(0)))
    frozen = {"tokenizer": unbox(jax.jit(fam.tokenizer.init)(jax.random.PRNGKey(1)))}
    batch = {"indices": jnp.zeros((2, fam.model.image_seq_len), jnp.int32), "label": jnp.array([0, 1])}
    loss, metrics = jax.jit(fam.loss)(params, batch, jax.random.PRNGKey(2), frozen)
    assert np.isfinite(float(loss)) and 0 < float(metrics["masked_fraction"]) <= 1
    images = jax.jit(fam.sample)(params, frozen, jnp.array([0, 1]), jax.random.PRNGKey(3))
    assert images.shape == (2,) + fam.image_shape() and float(jnp.abs(images).max()) <= 1.0
