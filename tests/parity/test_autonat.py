"""AutoNAT parity against the official LeapLabTHU/ImprovedNAT U-ViT and NATSchedule (fixture kind 'autonat', README
section I): logits (conditional, null class, CFG mix) and the sown block outputs, the training loss from the
injected Beta / uniform draws (label smoothing 0.1 and 0), and `generate()` replayed from its recorded draws through
jaxgen's own decoding update (`remask_update`), step by step.

The module is built from the fixture JSON's constructor kwargs, so any fixture of that format is checked the same way.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.autonat import convert_autonat
from jaxgen.families.nat.masking import masked_cross_entropy, token_mask
from jaxgen.families.nat.model import backbone_from_fields, intermediates
from jaxgen.families.nat.policy import tables_policy
from jaxgen.families.nat.sampler import guided_logits, remask_update
from tests.parity.fixtures import assert_close, assert_equal_int, parametrize_fixtures, require

pytestmark = pytest.mark.parity

ATOL = RTOL = 1e-4


def model_fields(meta) -> dict:
    kw = meta["constructor_kwargs"]
    assert kw.get("skip", True) and not kw.get("qkv_bias", False), "fixture U-ViT must have long skips, no qkv bias"
    assert kw.get("qk_scale") in (None, "None"), "a non-default qk_scale is not supported"
    return dict(embed_dim=int(kw["embed_dim"]), depth=int(kw["depth"]), num_heads=int(kw["num_heads"]),
                mlp_ratio=float(kw["mlp_ratio"]), codebook_size=int(kw["codebook_size"]),
                num_classes=int(kw["num_classes"]) - 1, image_seq_len=int(kw["img_size"]) ** 2)


def build(fixture):
    fields = model_fields(fixture.meta)
    model = backbone_from_fields("uvit", fields)
    params = convert_autonat(fixture.weights, fields)  # raises on a missing / unexpected key or a shape mismatch
    return model, jax.tree_util.tree_map(jnp.asarray, params)


@parametrize_fixtures("autonat")
def test_autonat_logits_and_hooks(fixture):
    fx = require(fixture)
    io = fx.io
    model, params = build(fx)
    labels = jnp.asarray(io["labels"][:, 0], jnp.int32)
    ids = jnp.asarray(io["masked_ids"], jnp.int32)
    logits, sown = jax.jit(lambda p, i, l: intermediates(model, p, i, l))(params, ids, labels)
    assert_close("logits", logits, io["logits"], ATOL, RTOL)
    hooks = [k for k in io if k.endswith("_out_row0")]
    assert hooks, "fixture has no <name>_out_row0 hooks"
    for key in hooks:
        assert_close(key, sown[key[:-len("_row0")]][:1], io[key], ATOL, RTOL)
    null = jnp.full_like(labels, model.null_label)
    uncond = jax.jit(lambda p, i, l: model.apply({"params": p}, i, l))(params, ids, null)
    assert_close("logits_uncond", uncond, io["logits_uncond"], ATOL, RTOL)
    cfg = guided_logits(model, params, ids, labels, io["cfg_scale"], True)
    assert_close("logits_cfg", cfg, io["logits_cfg"], 3e-4, RTOL)


@parametrize_fixtures("autonat")
def test_autonat_training_loss(fixture):
    fx = require(fixture)
    io = fx.io
    model, params = build(fx)
    x0 = jnp.asarray(io["loss_x0"], jnp.int32)
    mask = token_mask(jnp.asarray(io["loss_mask_probs"]), jnp.asarray(io["loss_rand"]))
    masked_ids = jnp.where(mask, model.mask_id, x0)
    assert_equal_int("loss_masked_ids", masked_ids, io["loss_masked_ids"])
    assert_equal_int("loss_ce_labels", jnp.where(mask, x0, -1), io["loss_ce_labels"])
    pred = model.apply({"params": params}, masked_ids, jnp.asarray(io["loss_context"][:, 0], jnp.int32))
    assert_close("loss_pred", pred, io["loss_pred"], ATOL, RTOL)
    smoothing = float(fx.meta.get("loss_smoothing", 0.1))
    for key, eps in (("loss", smoothing), ("loss_no_smoothing", 0.0)):
        loss, _ = masked_cross_entropy(pred, x0, mask, eps)
        assert_close(key, loss, io[key], 1e-5, 1e-5)
    assert_close("loss_masked_token_ratio", jnp.mean(mask.astype(jnp.float32)), io["loss_masked_token_ratio"], 1e-7, 0)


@parametrize_fixtures("autonat")
def test_autonat_generate_replay(fixture):
    fx = require(fixture)
    io = fx.io
    model, params = build(fx)
    steps = int(io["gen_manual_samp_temp"].shape[0])
    policy = tables_policy(steps, io["gen_manual_ratios"], io["gen_manual_temp"], io["gen_manual_samp_temp"],
                           io["gen_manual_cfg"])
    labels = jnp.asarray(io["gen_labels"][:, 0], jnp.int32)
    b, seq = io["gen_categorical_draws"].shape[1:]
    logits_fn = jax.jit(lambda p, i, w: guided_logits(model, p, i, labels, w, True))
    update = jax.jit(lambda *a: remask_update(*a, mask_id=model.mask_id))
    ids = jnp.full((b, seq), model.mask_id, jnp.int32)
    masked_before = jnp.asarray(seq, jnp.int32)
    for t in range(steps):
        assert_equal_int(f"gen_ids_in[{t}]", ids, io["gen_ids_in"][t])
        logits = logits_fn(params, ids, policy["guidance"][t])
        assert_close(f"gen_logits[{t}]", logits, io["gen_logits"][t], 3e-4, RTOL)
        # the recorded logits drive the update so every decision below is checked on the official numbers
        out = update(ids, jnp.asarray(io["gen_logits"][t]), jnp.asarray(io["gen_categorical_draws"][t]),
                     jnp.asarray(io["gen_gumbel_draws"][t], jnp.float32), policy["mask_ratio"][t],
                     policy["remask_temp"][t], masked_before)
        assert_equal_int(f"gen_sampled_ids[{t}]", out["sampled_ids"], io["gen_sampled_ids"][t])
        ref_lp = io["gen_sampled_logprob"][t]
        assert np.array_equal(np.isinf(np.asarray(out["logprob"])), np.isinf(ref_lp)), f"gen_sampled_logprob[{t}] inf"
        fin = np.isfinite(ref_lp)
        assert_close(f"gen_sampled_logprob[{t}]", np.asarray(out["logprob"])[fin], ref_lp[fin], 1e-5, 1e-5)
        conf = np.asarray(out["confidence"])
        ref_conf = io["gen_confidence"][t]
        assert np.array_equal(np.isinf(conf), np.isinf(ref_conf)), f"gen_confidence[{t}] inf pattern"
        fin = np.isfinite(ref_conf)
        assert_close(f"gen_confidence[{t}]", conf[fin], ref_conf[fin], 1e-5, 1e-5)
        assert int(out["mask_len"]) == int(io["gen_mask_len"][t]), f"gen_mask_len[{t}]"
        assert_equal_int(f"gen_remask[{t}]", out["remask"], io["gen_remask"][t])
        assert_equal_int(f"gen_ids_out[{t}]", out["ids"], io["gen_ids_out"][t])
        ids, masked_before, last = out["ids"], out["mask_len"], out["sampled_ids"]
    assert_equal_int("gen_out", np.asarray(last).reshape(io["gen_out"].shape), io["gen_out"])
