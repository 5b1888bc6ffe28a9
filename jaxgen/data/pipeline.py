"""grain input pipelines: the infinite, checkpointable training stream and one-pass readers for eval / caching.

Training order is a pure function of (seed, position): one global shuffle (fresh each epoch) of the whole source,
a per-example random flip drawn from (seed, global position), then process p of P takes global positions
p, p + P, p + 2P, ... So the local batches of all processes at step k together are exactly the global batch a
single process would see at step k, and an iterator restored from `get_state()` continues bit-identically.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import grain
import numpy as np

from jaxgen.data import sources as S
from jaxgen.data.digits import load_digits
from jaxgen.errors import DataError

SOURCE_NAMES = ("digits", "tfds", "imagefolder", "cached")
_IMAGE_KEYS = ("image", "label")


# ---------------------------------------------------------------------------------------------- sources

def build_source(data_cfg, split: Optional[str] = None):
    """The random-access source named by `data_cfg.source` for `split` (default `data_cfg.split`).

    imagefolder: `data_dir/<split>` when that folder exists (ImageNet layout), else `data_dir` itself.
    cached: `data_dir` is the code cache directory written by --mode=cache (it holds only the training split).
    """
    split = split or data_cfg.split
    kind = data_cfg.source
    data_dir = data_cfg.get("data_dir", "") or ""
    if kind == "digits":
        return S.DigitsSource(split)
    if kind == "imagefolder":
        root = os.path.join(data_dir, split) if data_dir and os.path.isdir(os.path.join(data_dir, split)) else data_dir
        return S.ImageFolderSource(root, data_cfg.image_size)
    if kind == "tfds":
        return S.TfdsSource(data_cfg.name, split, data_dir or None, data_cfg.image_size)
    if kind == "cached":
        return S.CachedCodesSource(data_dir)
    raise DataError(f"unknown data.source {kind!r}: use one of {', '.join(SOURCE_NAMES)}")


def _provided_keys(source) -> Tuple[str, ...]:
    return tuple(source.keys) + ("label",) if isinstance(source, S.CachedCodesSource) else _IMAGE_KEYS


def check_source(data_cfg, source, batch_keys: Sequence[str]) -> None:
    """Fail early, with the fix, when the source cannot give what the model asks for."""
    provided = _provided_keys(source)
    missing = [k for k in batch_keys if k not in provided]
    if missing:
        if "image" in missing:
            fix = "use an image source (data.source=digits, imagefolder or tfds)"
        else:
            fix = ("set data.cache_dir to a cache of this tokenizer written by --mode=cache (or clear it: the run "
                   "then writes one under its workdir)")
        raise DataError(f"the model needs batch key(s) {missing} but data.source={data_cfg.source!r} gives"
                        f" {list(provided)}: {fix}")
    if len(source) == 0:
        raise DataError(f"data source {source!r} is empty: point data.data_dir / data.split at real data")
    if "image" in provided:
        want = (int(data_cfg.image_size), int(data_cfg.image_size), int(data_cfg.channels))
        got = tuple(source[0]["image"].shape)
        if got != want:
            raise DataError(f"{source!r} gives {got[0]}x{got[1]}x{got[2]} images but the config says"
                            f" data.image_size={want[0]}, data.channels={want[2]}: set them to"
                            f" {got[0]} and {got[2]}")


def _in_memory(source) -> bool:
    # Threads only help sources that decode files; for arrays they just contend for the GIL.
    return isinstance(source, (S.DigitsSource, S.CachedCodesSource))


# ---------------------------------------------------------------------------------------------- transforms

class _Augment:
    """Per-example random choices (grain random_map: the rng depends only on the seed and the position).

    With data.random_flip: images flipped horizontally with p 0.5, or (code cache) the flipped image's codes.
    Also drops keys the model did not ask for.
    """

    def __init__(self, keys: Sequence[str], random_flip: bool):
        self.keys = tuple(keys)
        self.random_flip = bool(random_flip)

    def __call__(self, example: Dict[str, np.ndarray], rng: np.random.Generator) -> Dict[str, np.ndarray]:
        flip = rng.random() < 0.5
        out = {}
        for k in self.keys:
            v = example[k]
            if k == "image" and self.random_flip and flip:
                v = v[:, ::-1]
            elif self.random_flip and flip and f"{k}_flip" in example:
                v = example[f"{k}_flip"]  # the cache holds the flipped image's codes too
            out[k] = v
        return out


def _to_model_arrays(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """uint8 images -> float32 in [-1, 1]; labels and integer codes -> int32; float codes -> float32."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if k == "image":
            out[k] = v.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        elif k == "label" or (k not in ("mask", "index") and np.issubdtype(v.dtype, np.integer)):
            out[k] = v.astype(np.int32)
        elif np.issubdtype(v.dtype, np.floating):
            out[k] = v.astype(np.float32)
        else:
            out[k] = v
    return out


def _collate(examples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return _to_model_arrays({k: np.stack([e[k] for e in examples]) for k in examples[0]})


def read_options(source, data_cfg, batch_rows: int) -> grain.ReadOptions:
    prefetch = int(data_cfg.get("prefetch", 2))
    if _in_memory(source) or prefetch <= 0:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1), prefetch_buffer_size=prefetch * batch_rows)


def _process(process_index, process_count) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return int(process_index), int(process_count)


def _mark_absl_parsed() -> None:
    # grain's worker processes read absl flags; outside absl.app.run nobody has parsed them.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------- training

class _ProcessRows(grain.MapDataset):
    """This process's contiguous block of every global batch: local index i -> global row
    (i // b) * B + p * b + i % b, with B the global and b = B / P the local batch size."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def _row(self, index: int) -> int:
        batch, row = divmod(index, self._local)
        return batch * self._global + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._row(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._row(i) for i in indices])  # pylint: disable=protected-access


def make_train_iterator(data_cfg, batch_keys: Sequence[str], global_batch_size: int, seed: int,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        num_workers: Optional[int] = None) -> grain.DatasetIterator:
    """Infinite iterator of this process's local batches: dict of numpy arrays with exactly `batch_keys`.

    'image' float32 NHWC in [-1, 1], 'label' int32, cached codes float32 / int32; global_batch_size // process_count
    rows.
    Checkpoint it with `get_state()` / `set_state()` (or grain.checkpoint through orbax).
    """
    pi, pc = _process(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % pc:
        raise DataError(f"batch_size={global_batch_size} is not a positive multiple of the {pc} processes:"
                        f" set batch_size to a multiple of {pc}")
    local_batch = global_batch_size // pc
    source = build_source(data_cfg)
    check_source(data_cfg, source, batch_keys)
    workers = int(data_cfg.get("num_workers", 0) if num_workers is None else num_workers)

    ds = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat()  # reshuffled every epoch
    ds = ds.random_map(_Augment(batch_keys, data_cfg.get("random_flip", False)))
    # After shuffle and flip: process p reads rows p*b .. (p+1)*b-1 of every global batch of the single-process
    # stream, so the assembled global batch (and every per-row random draw) is the same for any process count.
    ds = _ProcessRows(ds, global_batch_size, pi, pc)
    it_ds = ds.to_iter_dataset(read_options(source, data_cfg, local_batch))
    it_ds = it_ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)
    if workers > 0:
        _mark_absl_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, int(data_cfg.get("prefetch", 2)))))
    return iter(it_ds)


# ---------------------------------------------------------------------------------------------- one pass

class _PaddedRows:
    """This process's rows of a one-pass read: padded positions repeat the last example with mask False."""

    def __init__(self, source, indices: np.ndarray, num_valid: int):
        self.source, self.indices, self.num_valid = source, indices, num_valid

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i])
        example = dict(self.source[min(index, self.num_valid - 1)])
        example["mask"] = np.bool_(index < self.num_valid)
        example["index"] = np.int64(index)
        return example


def iterate_dataset_once(data_cfg, batch_size: int, split: Optional[str] = None,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Every example of `split` exactly once, in source order, no augmentation (for the code cache).

    `batch_size` is global: global batch b holds examples b*B .. b*B+B-1 and process p gets rows
    p*B/P .. (p+1)*B/P-1 of it, so every process yields the same number of batches (static shapes for
    collectives). The last batch is padded; 'mask' (bool) marks real rows and 'index' gives each row's
    position in the source. Other keys as the source gives them ('image' float32 in [-1, 1], 'label' int32).
    """
    pi, pc = _process(process_index, process_count)
    if batch_size <= 0 or batch_size % pc:
        raise DataError(f"batch_size={batch_size} is not a positive multiple of the {pc} processes:"
                        f" use a multiple of {pc}")
    source = build_source(data_cfg, split)
    n = len(source)
    if n == 0:
        raise DataError(f"data source {source!r} is empty: point data.data_dir / data.split at real data")
    local = batch_size // pc
    num_batches = -(-n // batch_size)
    positions = np.arange(num_batches * batch_size).reshape(num_batches, pc, local)[:, pi].reshape(-1)
    ds = grain.MapDataset.source(_PaddedRows(source, positions, n))
    it_ds = ds.to_iter_dataset(read_options(source, data_cfg, local)).batch(local, batch_fn=_collate)
    yield from it_ds


def make_eval_arrays(data_cfg, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, labels int32) of a whole split (or its first `limit` examples), for metrics."""
    if data_cfg.source == "digits":
        images, labels = load_digits(split)
        return images[:limit], labels[:limit]
    if data_cfg.source == "cached":
        raise DataError("a code cache holds no images for metrics: give the image source (data.source=tfds or"
                        " imagefolder) for evaluation")
    source = build_source(data_cfg, split)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise DataError(f"data source {source!r} is empty: point data.data_dir / data.split at real data")
    ds = grain.MapDataset.source(source)[:n].to_iter_dataset(read_options(source, data_cfg, 64))
    examples = list(ds)
    return (np.stack([e["image"] for e in examples]).astype(np.uint8),
            np.asarray([e["label"] for e in examples], np.int32))
