"""The contract every registered family keeps (parametrised over `jaxgen.families.names()`): a new family passes it or
CI fails. Each is built from its registered tiny config (`families.tiny_config_name`).

- init returns params whose every leaf carries logical-axis metadata (so the mesh can shard it), and sharded init works
- `dummy_batch` has exactly the `batch_keys`, and the jitted loss on such a batch is finite with scalar metrics
- the weight-decay mask has the params' tree structure, with bool leaves
- a generator's sampler gives float32 NHWC images of the data's shape, in [-1, 1]; a tokenizer's encode gives its
  `cache_keys` with the shapes `code_shapes` promises, and decode(encode(x)) has x's shape, in [-1, 1]
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import families
from jaxgen.families.base import Tokenizer
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import sharding as sh
from jaxgen.train import restore


def _batch(shapes, num_classes, rng):
    out = {}
    for k, s in shapes.items():
        if k == "label":
            out[k] = rng.integers(0, num_classes, s.shape).astype(np.int32)
        elif jnp.issubdtype(s.dtype, jnp.integer):
            out[k] = rng.integers(0, 2, s.shape).astype(s.dtype)  # valid ids of any codebook
        else:
            out[k] = np.clip(rng.standard_normal(s.shape), -1, 1).astype(s.dtype)
    return out


@pytest.mark.parametrize("name", families.names())
def test_family_contract(name):
    config = config_lib.load(families.tiny_config_name(name))
    assert config.family == name, f"the registered tiny config of {name!r} is a {config.family!r} config"
    fam = families.build(config)
    key = jax.random.PRNGKey(0)

    boxed = jax.eval_shape(fam.init, key)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=is_box)
    unboxed = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
               if not is_box(x)]
    assert leaves and not unboxed, f"{name}: params without logical axes (with_axes): {unboxed[:5]}"
    mesh = mesh_lib.make_mesh(config.mesh)
    params, shardings = sh.sharded_init(lambda: fam.init(key), mesh, config.mesh.rules)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(restore.abstract_params(fam))

    shapes = fam.dummy_batch(2)
    assert tuple(shapes) == tuple(fam.batch_keys), (tuple(shapes), fam.batch_keys)
    rng = np.random.default_rng(0)
    batch = _batch(shapes, int(config.data.num_classes), rng)
    frozen = {}
    if fam.tokenizer is not None:
        frozen = {"tokenizer": nn.meta.unbox(jax.jit(fam.tokenizer.init)(jax.random.PRNGKey(1)))}
    loss, metrics = jax.jit(fam.loss)(params, batch, jax.random.PRNGKey(2), frozen)
    assert loss.shape == () and np.isfinite(float(loss)), f"{name}: loss {loss}"
    assert metrics and all(np.shape(v) == () and np.isfinite(float(v)) for v in metrics.values()), metrics

    mask = fam.weight_decay_mask(params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert all(isinstance(m, (bool, np.bool_)) or getattr(m, "dtype", None) == bool
               for m in jax.tree_util.tree_leaves(mask))

    image_shape = fam.image_shape()
    if fam.can_sample:
        labels = jnp.arange(2, dtype=jnp.int32) % int(config.data.num_classes)
        images = jax.jit(fam.sample)(params, frozen, labels, jax.random.PRNGKey(3))
        assert images.shape == (2,) + image_shape and images.dtype == jnp.float32
        assert float(jnp.min(images)) >= -1.0 and float(jnp.max(images)) <= 1.0
    if isinstance(fam, Tokenizer):
        x = jnp.asarray(np.clip(rng.standard_normal((2,) + image_shape), -1, 1), jnp.float32)
        codes = jax.jit(fam.encode)(params, x)
        assert tuple(sorted(codes)) == tuple(sorted(fam.cache_keys))
        for k, s in fam.code_shapes().items():
            assert codes[k].shape == (2,) + s.shape and codes[k].dtype == s.dtype, k
        recon = jax.jit(fam.decode)(params, codes)
        assert recon.shape == x.shape and recon.dtype == jnp.float32
        assert float(jnp.min(recon)) >= -1.0 and float(jnp.max(recon)) <= 1.0
    else:
        assert fam.can_sample, f"{name}: a generator family must implement sample()"
