"""Data sources and the grain training pipeline (issue 2, item 7): determinism across restarts, per-process rows,
image folders (ADM centre crop), TFDS array_record through `tfds.data_source`, and the latent cache."""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.common import base_config
from jaxgen.data import pipeline as P
from jaxgen.data import sources as S
from jaxgen.errors import DataError


def _data_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = base_config().data
    cfg.prefetch = 0  # in-process reads: the tests stay cheap and single-threaded
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _digits_iter(seed, batch=8, pi=0, pc=1, **cfg):
    return P.make_train_iterator(_data_cfg(**cfg), ("image", "label"), batch, seed, process_index=pi,
                                 process_count=pc)


# ---------------------------------------------------------------------------------------------- determinism

def test_restored_iterator_continues_identically():
    it = _digits_iter(seed=3, random_flip=True)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores survives serialisation
    after = _take(it, 4)
    fresh = _digits_iter(seed=3, random_flip=True)  # a new process: a new iterator, then the saved state
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), after)


def test_same_seed_agrees_different_seed_differs():
    a, b, c = (_take(_digits_iter(seed=s), 3) for s in (5, 5, 6))
    _assert_batches_equal(a, b)
    assert not all(np.array_equal(x["label"], y["label"]) and np.array_equal(x["image"], y["image"])
                   for x, y in zip(a, c))
    batch = a[0]
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 32, 32, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_process_local_batches_concatenate_to_the_global_batch():
    steps = 4
    whole = _take(_digits_iter(seed=7, batch=8, random_flip=True), steps)
    parts = [_take(_digits_iter(seed=7, batch=8, pi=p, pc=2, random_flip=True), steps) for p in range(2)]
    for k in range(steps):
        assert parts[0][k]["image"].shape[0] == 4
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def test_process_rows_across_epochs(tmp_path):
    """A 10-example source, global batch 4, 3 processes would not divide; 2 do: epochs wrap mid-batch."""
    n = 10
    moments = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 4), np.float32)
    S.write_code_cache(str(tmp_path), {"moments": moments}, {"moments": -moments - 1}, np.arange(n) % 3)
    cfg = _data_cfg(source="cached", data_dir=str(tmp_path))
    mk = lambda pi, pc: P.make_train_iterator(cfg, ("moments", "label"), 4, 1, process_index=pi,  # noqa: E731
                                              process_count=pc)
    steps = 8  # 32 rows: three full passes over the 10 examples
    whole = _take(mk(0, 1), steps)
    parts = [_take(mk(p, 2), steps) for p in range(2)]
    for k in range(steps):
        for key in ("moments", "label"):
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
    seen = np.concatenate([b["moments"][:, 0, 0, 0] for b in whole]).astype(int)
    for epoch in range(3):  # each epoch is a permutation of the source
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    with pytest.raises(DataError, match="multiple of 3"):
        P.make_train_iterator(cfg, ("moments", "label"), 4, 1, process_index=0, process_count=3)


# ---------------------------------------------------------------------------------------------- image folder

def _adm_reference(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop written out independently: BOX-halve while the short side >= 2*size, BICUBIC so the
    short side is `size`, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def _write_folder(root, rng):
    """Classes 'cat' (2 images), 'ant' (1), 'bee' (2), a non-image file, a hidden folder; mixed sizes and modes."""
    specs = {"cat": [(40, 90, "RGB"), (16, 16, "RGB")], "ant": [(70, 50, "L")], "bee": [(33, 33, "RGB"), (20, 64, "RGBA")]}
    images = {}
    for cls, shapes in specs.items():
        os.makedirs(os.path.join(root, cls))
        for i, (h, w, mode) in enumerate(shapes):
            chans = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            arr = rng.integers(0, 256, (h, w, chans), dtype=np.uint8)
            img = Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)
            path = os.path.join(root, cls, f"img{i}.png")
            img.save(path)
            images[path] = img
    open(os.path.join(root, "cat", "notes.txt"), "w").write("not an image")
    os.makedirs(os.path.join(root, ".hidden"))
    return images


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    images = _write_folder(str(tmp_path / "train"), rng)
    src = S.ImageFolderSource(str(tmp_path / "train"), 16)
    assert src.classes == ["ant", "bee", "cat"]
    assert len(src) == 5
    labels = [int(src[i]["label"]) for i in range(len(src))]
    assert labels == [0, 1, 1, 2, 2]
    for i, (path, label) in enumerate(src.samples):
        ex = src[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(ex["image"], _adm_reference(images[path].convert("RGB"), 16), err_msg=path)
    # An image already at the target size is passed through untouched.
    small = [i for i, (p, _) in enumerate(src.samples) if images[p].size == (16, 16)][0]
    np.testing.assert_array_equal(src[small]["image"], np.asarray(images[src.samples[small][0]]))

    # Through the pipeline: data_dir/<split> is used when it exists.
    cfg = _data_cfg(source="imagefolder", data_dir=str(tmp_path), image_size=16, channels=3)
    batch = next(P.make_train_iterator(cfg, ("image", "label"), 4, 0, process_index=0, process_count=1))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    with pytest.raises(DataError, match="data.image_size=32"):
        P.make_train_iterator(_data_cfg(source="imagefolder", data_dir=str(tmp_path), image_size=32, channels=1),
                              ("image", "label"), 4, 0, process_index=0, process_count=1)
    with pytest.raises(DataError, match="does not exist"):
        S.ImageFolderSource(str(tmp_path / "nope"), 16)
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(DataError, match="holds no images"):
        S.ImageFolderSource(str(tmp_path / "empty"), 16)


# ---------------------------------------------------------------------------------------------- TFDS

def _tiny_tfds_dataset(data_dir):
    """A tiny image dataset prepared as array_record, the way ImageNet is prepared for jaxgen (no TensorFlow)."""
    import tensorflow_datasets as tfds

    class JaxgenTestTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # A one-part module name: for a class inside a package tfds resolves its code path through the
        # `importlib_resources` backport, which jaxgen does not install.
        __module__ = "jaxgen_test_tfds"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6, 0), "validation": self._generate_examples(3, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                arr = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
                yield i, {"image": Image.fromarray(arr), "label": i % 3}

    builder = JaxgenTestTinyImages(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.name


def test_tfds_array_record_source(tmp_path):
    import tensorflow_datasets as tfds

    name = _tiny_tfds_dataset(str(tmp_path))
    # Read back from the prepared files alone (the builder class is not registered: as for a dataset
    # prepared elsewhere), exactly as `tfds.data_source` would.
    src = S.TfdsSource(name, "train", str(tmp_path), 16)
    raw = tfds.data_source(name, split="train", data_dir=str(tmp_path))
    assert len(src) == len(raw) == 6
    for i in range(len(src)):
        ex = src[i]
        assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
        assert int(ex["label"]) == int(raw[i]["label"])
        np.testing.assert_array_equal(ex["image"], _adm_reference(Image.fromarray(np.asarray(raw[i]["image"])), 16))

    cfg = _data_cfg(source="tfds", name=name, data_dir=str(tmp_path), image_size=16, channels=3)
    it = P.make_train_iterator(cfg, ("image", "label"), 4, 0, process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
    images, labels = P.make_eval_arrays(cfg, "validation")
    val = tfds.data_source(name, split="validation", data_dir=str(tmp_path))  # tfds stores records key-shuffled
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [int(val[i]["label"]) for i in range(3)]

    with pytest.raises(DataError, match="set data.split"):
        S.TfdsSource(name, "nosplit", str(tmp_path), 16)
    with pytest.raises(DataError, match="not found"):
        S.TfdsSource("jaxgen_no_such_dataset", "train", str(tmp_path), 16)
    with pytest.raises(DataError, match="does not exist"):
        S.TfdsSource(name, "train", str(tmp_path / "missing"), 16)


def test_tfds_mock_data_source(monkeypatch):
    """tfds.testing.mock_data fakes a catalogue dataset's records offline; TfdsSource reads them as real ones."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5):
        # mock_data fakes the records, not the prepared-on-disk state that TfdsSource checks first.
        monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        src = S.TfdsSource("mnist", "train", None, 32)
        raw = tfds.data_source("mnist", split="train")
        assert len(src) == len(raw) == 5
        ex = src[0]
        assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8  # 28x28 -> ADM resize to 32
        assert int(ex["label"]) == int(raw[0]["label"])
        batch = next(P.make_train_iterator(_data_cfg(source="tfds", name="mnist", image_size=32, channels=1),
                                           ("image", "label"), 4, 0, process_index=0, process_count=1))
        assert batch["image"].shape == (4, 32, 32, 1)


# ---------------------------------------------------------------------------------------------- code cache

def test_code_cache_round_trip(tmp_path):
    """Any tokenizer's codes: float moments (stored float16) and integer indices side by side."""
    rng = np.random.default_rng(0)
    n, shape = 11, (2, 2, 8)
    moments = rng.standard_normal((n,) + shape).astype(np.float32)
    flipped = rng.standard_normal((n,) + shape).astype(np.float32)
    idx, idx_flip = rng.integers(0, 4096, (n, 30)), rng.integers(0, 4096, (n, 30))
    labels = rng.integers(0, 10, n).astype(np.int32)
    specs = {"moments": (shape, np.float16), "indices": ((30,), np.int32)}
    d = str(tmp_path / "cache")
    assert not S.code_cache_exists(d)
    writer = S.CodeCacheWriter(d, n, specs)
    order = rng.permutation(n)
    for chunk in np.array_split(order, 3):  # any order, any batch size
        writer.write(chunk, {"moments": moments[chunk], "indices": idx[chunk]},
                     {"moments": flipped[chunk], "indices": idx_flip[chunk]}, labels[chunk])
    assert not S.code_cache_exists(d)  # not finished: no meta.json yet
    writer.finish({"tokenizer": "kl_vae"})
    assert S.code_cache_exists(d)

    src = S.CachedCodesSource(d)
    assert len(src) == n and src.meta["tokenizer"] == "kl_vae" and set(src.keys) == {"moments", "indices"}
    assert src.meta["keys"]["moments"] == {"shape": list(shape), "dtype": "float16"}
    for i in range(n):
        ex = src[i]
        assert int(ex["label"]) == labels[i] and ex["indices"].dtype == np.int32
        np.testing.assert_array_equal(ex["moments"], moments[i].astype(np.float16))
        np.testing.assert_array_equal(ex["moments_flip"], flipped[i].astype(np.float16))
        np.testing.assert_array_equal(ex["indices"], idx[i])
        np.testing.assert_array_equal(ex["indices_flip"], idx_flip[i])

    # An unfinished rewrite over a complete cache leaves an incomplete (not a stale-but-valid) directory.
    S.CodeCacheWriter(d, n, specs)
    assert not S.code_cache_exists(d)
    with pytest.raises(DataError, match="no meta.json"):
        S.CachedCodesSource(d)
    with pytest.raises(ValueError, match="never written"):
        S.CodeCacheWriter(str(tmp_path / "partial"), 3, specs).finish()


@pytest.mark.parametrize("random_flip", [False, True])
def test_cached_moments_flip_only_with_random_flip(tmp_path, random_flip):
    n = 64
    idx = np.arange(n, dtype=np.float32)
    moments = np.broadcast_to(idx[:, None, None, None], (n, 2, 2, 4)).copy()
    S.write_code_cache(str(tmp_path), {"moments": moments}, {"moments": -moments - 1}, np.arange(n) % 10)  # flip: -(i+1)
    cfg = _data_cfg(source="cached", data_dir=str(tmp_path), random_flip=random_flip)
    it = P.make_train_iterator(cfg, ("moments", "label"), 16, 0, process_index=0, process_count=1)
    batches = _take(it, 4)  # one epoch
    assert all(set(b) == {"moments", "label"} for b in batches)  # moments_flip is never handed to the model
    vals = np.concatenate([b["moments"][:, 0, 0, 0] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    index = np.where(vals >= 0, vals, -vals - 1).astype(int)
    assert sorted(index.tolist()) == list(range(n))
    np.testing.assert_array_equal(labels, index % 10)
    flipped = int((vals < 0).sum())
    if random_flip:
        assert 16 <= flipped <= 48, flipped  # p = 0.5 per example
    else:
        assert flipped == 0
