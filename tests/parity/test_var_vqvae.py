"""Parity of VAR's multi-scale VQVAE with the official PyTorch module (fixture kind 'var_vqvae')."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.var import convert_vqvae, vqvae_arch_from_state_dict
from jaxgen import strict
from jaxgen.tokenizers.msvq import VQVAE
from tests.parity.fixtures import assert_close, assert_equal_int, parametrize_fixtures, require

ATOL = RTOL = 1e-4


def build_vqvae(fixture):
    """Model + params from the fixture JSON: constructor kwargs, architecture the kwargs cannot express (the fixture's
    ch_mult deviation) read from the state_dict shapes."""
    shapes = {k: tuple(v["shape"]) for k, v in fixture.meta["state_dict"].items()}
    cfg = dict(vqvae_arch_from_state_dict(shapes))
    cfg.update({k: v for k, v in fixture.meta["constructor_kwargs"].items() if k != "test_mode"})
    model = strict.build(VQVAE, cfg, "the fixture's VQVAE fields")
    params = convert_vqvae(fixture.weights, cfg)
    return model, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


def msvq_family(model: VQVAE):
    """The tokenizer family around a fixture's VQVAE (what VAR's sampler talks to)."""
    from configs.common import base_config
    from jaxgen.families.msvq import MSVQFamily

    c = base_config()
    c.family = "msvq"
    c.model.update({f: getattr(model, f) for f in strict.field_names(VQVAE) if f not in ("dtype", "param_dtype")})
    c.data.image_size = model.v_patch_nums[-1] * 2 ** (len(model.ch_mult) - 1)
    c.data.channels = model.in_channels
    return MSVQFamily(c)


def nhwc(x):
    return np.moveaxis(np.asarray(x), -3, -1)  # (..., C, H, W) -> (..., H, W, C)


def nchw(x):
    return np.moveaxis(np.asarray(x), -1, -3)


@pytest.mark.parity
@parametrize_fixtures("var_vqvae")
def test_var_vqvae_parity(fixture):
    fx = require(fixture)
    io = fx.io
    model, variables = build_vqvae(fx)
    call = lambda method, *a: model.apply(variables, *a, method=method)  # noqa: E731
    S = len(model.v_patch_nums)
    report = {}

    def close(name, ours):
        report[name] = assert_close(name, ours, io[name], ATOL, RTOL)

    img = jnp.asarray(nhwc(io["image"]))
    f = call(VQVAE.encode, img)
    close("f", nchw(f))

    idx_list, fhat_list = call(VQVAE.quantize, jnp.asarray(nhwc(io["f"])))
    for si in range(S):
        assert_equal_int(f"idx_s{si}", idx_list[si], io[f"idx_s{si}"])
    assert_equal_int("idx_Bl", np.concatenate([np.asarray(i) for i in idx_list], 1), io["idx_Bl"])
    # the end-to-end path (image -> indices) as the official img_to_idxBl
    for si, idx in enumerate(call(VQVAE.img_to_idx, img)):
        assert_equal_int(f"img_to_idx_s{si}", idx, io[f"idx_s{si}"])
    close("fhat_per_scale", nchw(np.stack([np.asarray(x) for x in fhat_list])))

    close("img_to_reconstructed_img_last", nchw(call(VQVAE.img_to_reconstructed_img, img)))

    ref_idx = [jnp.asarray(io[f"idx_s{si}"]) for si in range(S)]
    close("idxBl_to_img_last", nchw(call(lambda m, i: m.idx_to_img(i, last_one=True), ref_idx)))
    all_imgs = call(lambda m, i: m.idx_to_img(i, last_one=False), ref_idx)
    close("idxBl_to_img_all", nchw(np.stack([np.asarray(x) for x in all_imgs])))
    close("fhat_to_img", nchw(call(VQVAE.fhat_to_img, jnp.asarray(nhwc(io["fhat_per_scale"][-1])))))
    close("var_input", call(VQVAE.idx_to_var_input, ref_idx))

    f_hat = jnp.zeros(nhwc(io["ar_input_fhat_s0"]).shape, jnp.float32)
    for si, pn in enumerate(model.v_patch_nums):
        h = call(VQVAE.idx_map, ref_idx[si], pn)
        f_hat, nxt = call(VQVAE.next_ar_input, si, f_hat, h)
        close(f"ar_input_next_s{si}", nchw(nxt))
        close(f"ar_input_fhat_s{si}", nchw(f_hat))

    outputs = [k for k, v in fx.meta["arrays"].items() if v["role"] == "output"]
    checked = set(report) | {k for k in outputs if k.startswith("idx_")}
    assert set(outputs) <= checked, f"outputs not compared: {sorted(set(outputs) - checked)}"
    for name, (d, r) in report.items():
        print(f"[var_vqvae:{fx.name}] {name}: max|diff| {d:.3e}  max|diff|/max|ref| {r:.3e}")
