"""Parity of the VAR transformer and its greedy KV-cached sampler with the official PyTorch code (fixture kind 'var').

The sampler path decodes with the VQVAE of the `var_vqvae` fixture (the official VAR fixture's `vae_local`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.var import convert_var, var_arch_from_state_dict
from jaxgen.families.var.model import VAR, block_causal_bias, level_ids
from jaxgen.families.var.sampler import autoregressive_infer_cfg
from tests.parity.fixtures import (assert_close, assert_equal_int, fixtures_of, parametrize_fixtures, require)
from tests.parity.test_var_vqvae import build_vqvae, msvq_family

ATOL = RTOL = 1e-4


def build_var(fixture):
    kw = fixture.meta["constructor_kwargs"]
    arch = var_arch_from_state_dict({k: tuple(v["shape"]) for k, v in fixture.meta["state_dict"].items()})
    model = VAR(vocab_size=arch["vocab_size"], cvae=arch["cvae"], num_classes=kw["num_classes"], depth=kw["depth"],
                embed_dim=kw["embed_dim"], num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"],
                drop_path_rate=kw["drop_path_rate"], norm_eps=kw["norm_eps"], shared_aln=kw["shared_aln"],
                cond_drop_rate=kw["cond_drop_rate"], attn_l2_norm=kw["attn_l2_norm"],
                patch_nums=tuple(kw["patch_nums"]))
    params = convert_var(fixture.weights, dict(depth=kw["depth"], embed_dim=kw["embed_dim"],
                                               num_heads=kw["num_heads"], num_classes=kw["num_classes"],
                                               attn_l2_norm=kw["attn_l2_norm"], shared_aln=kw["shared_aln"],
                                               patch_nums=kw["patch_nums"], drop_path_rate=kw["drop_path_rate"]))
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def matching_vqvae(model):
    for fx in fixtures_of("var_vqvae"):
        sd = fx.meta["state_dict"]
        if tuple(sd["quantize.embedding.weight"]["shape"]) == (model.vocab_size, model.cvae) and \
                tuple(fx.meta["constructor_kwargs"]["v_patch_nums"]) == tuple(model.patch_nums):
            model, variables = build_vqvae(fx)
            return msvq_family(model), variables
    pytest.fail("no var_vqvae fixture matches the VAR fixture's vocabulary / Cvae / patch_nums (its vae_local)")


@pytest.mark.parity
@parametrize_fixtures("var")
def test_var_parity(fixture):
    fx = require(fixture)
    io = fx.io
    model, params = build_var(fx)
    report = {}

    def close(name, ours):
        report[name] = assert_close(name, ours, io[name], ATOL, RTOL)

    labels = jnp.asarray(io["label_B"], jnp.int32)
    logits, inter = model.apply({"params": params}, labels, jnp.asarray(io["x_BLCv_wo_first_l"]),
                                mutable=["intermediates"])
    for i in range(model.depth):
        close(f"block{i}_out", inter["intermediates"][f"block{i}_out"][0])
    close("logits", logits)

    bias = block_causal_bias(model.patch_nums)
    assert np.array_equal(bias, io["attn_bias_for_masking"]), "attn_bias_for_masking differs"
    assert_equal_int("lvl_1L", level_ids(model.patch_nums)[None], io["lvl_1L"])

    # Greedy (top_k=1) KV-cached sampling with CFG, decoded by the matching VQVAE fixture.
    tokenizer, vae_vars = matching_vqvae(model)
    run = jax.jit(lambda p, vp, lab, rng: autoregressive_infer_cfg(model, tokenizer, p, vp, lab, rng, cfg=float(io["ar_cfg"]),
                                                                    top_k=1, top_p=0.0, return_details=True))
    out = run(params, vae_vars["params"], labels, jax.random.PRNGKey(0))
    close("ar_logits_after_cfg", out["logits"])
    assert_equal_int("ar_idx", out["idx"], io["ar_idx"])
    close("ar_image", np.moveaxis((np.asarray(out["image"]) + 1.0) * 0.5, -1, 1))

    outputs = [k for k, v in fx.meta["arrays"].items() if v["role"] == "output"]
    checked = set(report) | {"attn_bias_for_masking", "lvl_1L", "ar_idx"}
    assert set(outputs) <= checked, f"outputs not compared: {sorted(set(outputs) - checked)}"
    for name, (d, r) in report.items():
        print(f"[var:{fx.name}] {name}: max|diff| {d:.3e}  max|diff|/max|ref| {r:.3e}")
