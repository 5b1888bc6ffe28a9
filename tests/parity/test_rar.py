"""RAR transformer parity against the official bytedance/1d-tokenizer module (fixture kind 'rar', README section F),
and the full-size B/L/XL/XXL key / shape manifests (section H).

The module is built from the fixture JSON's OmegaConf config, so any fixture of that format (other tiny config,
other seed) is checked the same way. The KV-cache outputs come from one compiled `decode_step` called at traced
positions, as a sampler runs it.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.rar import RAR_IGNORED, RAR_SIZES, convert_rar, rar_fields_from_state_dict
from jaxgen.convert.torch_layout import check_tree_shapes
from jaxgen.families.rar.model import RAR, abstract_params, rar_from_fields, shuffle_tokens
from tests.parity.fixtures import assert_close, assert_equal_int, parametrize_fixtures, parity_dir, require

pytestmark = pytest.mark.parity

ATOL = RTOL = 1e-4  # README: encoder/decoder/logit outputs

# official config.model.generator name -> RAR field
_GENERATOR_FIELDS = {"hidden_size": "hidden_size", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
                     "intermediate_size": "mlp_dim", "dropout": "dropout", "attn_drop": "attn_dropout",
                     "image_seq_len": "image_seq_len", "condition_num_classes": "num_classes",
                     "class_label_dropout": "class_drop_prob"}
# keys with no effect on the module's numbers in eval mode (memory / sampling / training-schedule settings)
_NO_EFFECT = {"use_checkpoint", "randomize_temperature", "guidance_scale", "guidance_scale_pow",
              "randomness_anneal_start", "randomness_anneal_end"}


def model_fields(meta) -> dict:
    cfg = meta["constructor_kwargs"]["config"]["model"]
    gen = dict(cfg["generator"])
    unknown = sorted(set(gen) - set(_GENERATOR_FIELDS) - _NO_EFFECT)
    assert not unknown, f"fixture config has generator keys this test does not map: {unknown}"
    fields = {_GENERATOR_FIELDS[k]: v for k, v in gen.items() if k in _GENERATOR_FIELDS}
    fields["codebook_size"] = int(cfg["vq_model"]["codebook_size"])
    return fields


def build(fixture):
    fields = model_fields(fixture.meta)
    model = rar_from_fields(fields)
    params = convert_rar(fixture.weights, fields)  # raises on a missing / unexpected key or a shape mismatch
    return model, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


@parametrize_fixtures("rar")
def test_rar_parity(fixture):
    fx = require(fixture)
    io = fx.io
    model, variables = build(fx)
    outputs = {n for n, v in fx.meta["arrays"].items() if v["role"] == "output"}
    report, exact = {}, set()

    # every output the JSON lists is compared (checked at the end); one it does not list is skipped
    def close(name, ours):
        if name in outputs:
            report[name] = assert_close(name, ours, io[name], ATOL, RTOL)

    def equal(name, ours):
        if name in outputs:
            assert_equal_int(name, ours, io[name])
            exact.add(name)

    tokens = jnp.asarray(io["input_ids"], jnp.int32)
    labels = jnp.asarray(io["class_labels"], jnp.int32)
    null = jnp.full_like(labels, model.null_label)
    b = tokens.shape[0]

    def run(method, *args, **kw):
        return model.apply(variables, *args, method=method, **kw)

    equal("condition", run(RAR.condition_ids, labels))
    equal("none_condition", run(RAR.condition_ids, null))

    # shuffled order (row 0 random, row 1 raster): logits, targets and the per-block outputs
    orders = jnp.asarray(io["orders"], jnp.int32)
    logits, state = run(RAR.forward_logits, tokens, labels, orders, mutable=["intermediates"])
    close("logits", logits)
    for i in range(model.depth):
        close(f"block{i}_out", state["intermediates"][f"block{i}_out"][0])
    equal("labels_shuffled", shuffle_tokens(tokens, orders))
    # the teacher-forcing __call__ is the same minus the position after the last token
    np.testing.assert_allclose(run(RAR.__call__, tokens, labels, orders), np.asarray(logits)[:, :-1], atol=1e-5)

    close("logits_raster", run(RAR.forward_logits, tokens, labels))
    close("logits_uncond_raster", run(RAR.forward_logits, tokens, null))

    k = int(io["sampling_prefix_len"]) if "sampling_prefix_len" in io else 0
    close("logits_sampling_prefix", run(RAR.forward_logits, tokens[:, :k], labels))

    # fixed-size KV cache: prefill, then ONE compiled decode_step at traced positions 0 .. k-1
    traces = []

    def decode(v, tok, pos, lab, cache):
        traces.append(pos)  # runs once per compilation
        return model.apply(v, tok, pos, lab, cache, method=RAR.decode_step)

    prefill = jax.jit(lambda v, lab, cache: model.apply(v, lab, cache, method=RAR.prefill))
    step = jax.jit(decode)
    out, cache = prefill(variables, labels, model.init_cache(b))
    steps = [out]
    for s in range(k):
        out, cache = step(variables, tokens[:, s], jnp.int32(s), labels, cache)
        steps.append(out)
    assert len(traces) == 1, "decode_step recompiled for a new position"
    close("logits_kvcache_steps", jnp.stack(steps, axis=1))

    checked = set(report) | exact
    assert outputs <= checked, f"outputs not compared: {sorted(outputs - checked)}"
    for name, (d, r) in report.items():
        print(f"[rar:{fx.name}] {name}: max|diff| {d:.3e}  max|diff|/max|ref| {r:.3e}")


# ----------------------------------------------------------------------------- full-size manifests
MANIFESTS = [("rar_b", "b"), ("rar_l", "l"), ("rar_xl", "xl"), ("rar_xxl", "xxl")]


@pytest.mark.parametrize("manifest_name,size", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_rar_manifest(manifest_name, size):
    path = os.path.join(parity_dir(), "manifests", f"{manifest_name}.json")
    if not os.path.exists(path):
        pytest.fail(f"manifest {path} missing (set JAXGEN_PARITY_DIR)")
    manifest = json.load(open(path))
    zero = np.zeros((), np.float32)
    sd = {k: np.broadcast_to(zero, tuple(v["shape"])) for k, v in manifest["state_dict"].items()}

    model = rar_from_fields(RAR_SIZES[size])  # official defaults: codebook 1024, 1000 classes, 256 tokens
    arch = rar_fields_from_state_dict(sd)
    for name, value in arch.items():
        assert getattr(model, name) == value, f"{manifest_name}: {name} {getattr(model, name)} vs checkpoint {value}"
    params = convert_rar(sd, RAR_SIZES[size], views=True)  # views: nothing allocated
    reference = abstract_params(model)
    check_tree_shapes(params, reference, f"{manifest_name} params vs RAR-{size.upper()}")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(reference))
    assert len(jax.tree_util.tree_leaves(params)) == manifest["num_state_dict_entries"]
    assert n_params == manifest["num_float_elements"], (n_params, manifest["num_float_elements"])
    assert set(manifest.get("non_persistent_buffers", [])) <= set(RAR_IGNORED)
    print(f"{manifest_name}: {manifest['num_state_dict_entries']} keys, {n_params:,} parameters match")
