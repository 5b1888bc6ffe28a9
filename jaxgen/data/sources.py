"""Random-access data sources (grain's `__len__` / `__getitem__` protocol) that return one example as a dict.

Image sources return {'image': uint8 HWC, 'label': int32}; the code cache returns each of the tokenizer's cache keys
and its `_flip` twin (e.g. {'moments', 'moments_flip', 'label'}) and the pipeline picks one of the two.
Sources are picklable (grain sends them to worker processes): heavy handles are opened lazily.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from jaxgen.data.digits import load_digits
from jaxgen.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------- ADM crop

def adm_center_crop(image, image_size: int) -> np.ndarray:
    """ADM / guided-diffusion preprocessing used by MAR, VAR and RAR: uint8 (size, size, C).

    Halve with a BOX filter while the short side is >= 2 * size (cheap anti-aliasing), BICUBIC-resize so the
    short side equals `size`, then take the centre square. Accepts a PIL image or a uint8 HWC / HW array.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[:2] == (image_size, image_size):
            return image  # already the target size: the resize would be an identity
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


# ---------------------------------------------------------------------------------------------- digits

class DigitsSource:
    """The bundled 32x32x1 MNIST digits (see `jaxgen.data.digits`)."""

    def __init__(self, split: str = "train"):
        self.split = split
        self._images, self._labels = load_digits(split)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        return {"image": self._images[index], "label": np.int32(self._labels[index])}

    def __repr__(self):
        return f"DigitsSource(split={self.split!r}, n={len(self)})"


# ---------------------------------------------------------------------------------------------- image folder

def _require_dir(path: str, what: str, fix: str) -> None:
    if not path:
        raise DataError(f"no {what} given: {fix}")
    if not os.path.isdir(path):
        raise DataError(f"{what} {path!r} does not exist or is not a directory: {fix}")


class ImageFolderSource:
    """ImageNet layout: `root/<class_name>/<image>`; labels are the indices of the sorted class names. RGB."""

    def __init__(self, root: str, image_size: int):
        _require_dir(root, "image folder", "set data.data_dir to a folder with one sub-folder of images per class")
        self.root = root
        self.image_size = int(image_size)
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(root, name)
            files = sorted(f for f in os.listdir(class_dir)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            samples.extend((os.path.join(class_dir, f), label) for f in files)
        if not samples:
            raise DataError(f"image folder {root!r} holds no images: expected {root}/<class_name>/<image>"
                            f" with extensions {', '.join(IMAGE_EXTENSIONS)}")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        from PIL import Image

        path, label = self.samples[int(index)]
        with Image.open(path) as img:
            image = adm_center_crop(img.convert("RGB"), self.image_size)
        return {"image": image, "label": np.int32(label)}

    def __repr__(self):
        return f"ImageFolderSource(root={self.root!r}, classes={len(self.classes)}, n={len(self)})"


# ---------------------------------------------------------------------------------------------- tfds

def _prepare_hint(name: str, data_dir: Optional[str]) -> str:
    where = data_dir or "DIR"
    return (f"prepare it with `tfds build {name} --file_format=array_record --data_dir={where}`"
            f" and set data.data_dir={where}")


class TfdsSource:
    """A prepared tfds dataset in array_record format, read with `tfds.data_source` (no TensorFlow needed).

    Uses the features 'image' (decoded uint8 HWC, ADM-cropped to `image_size`) and 'label'.
    """

    def __init__(self, name: str, split: str, data_dir: Optional[str], image_size: int):
        import tensorflow_datasets as tfds

        if not name:
            raise DataError("data.source=tfds needs data.name (the tfds dataset name, e.g. imagenet2012)")
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.image_size = int(image_size)
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise DataError(f"tfds data_dir {self.data_dir!r} does not exist: {_prepare_hint(name, self.data_dir)}")
        try:
            builder = tfds.builder(name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"tfds dataset {name!r} not found (in data_dir={self.data_dir!r}): check data.name,"
                            f" or {_prepare_hint(name, self.data_dir)}") from None
        if not builder.is_prepared():
            raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}:"
                            f" {_prepare_hint(name, self.data_dir)}")
        try:
            self._source = builder.as_data_source(split=split)
        except NotImplementedError:
            raise DataError(f"tfds dataset {name!r} in {builder.data_dir!r} is not in a random-access format:"
                            f" rebuild it, {_prepare_hint(name, self.data_dir)}") from None
        except ValueError as e:  # unknown split
            raise DataError(f"tfds dataset {name!r}: {str(e).splitlines()[0]} (set data.split)") from None
        features = builder.info.features
        missing = [k for k in ("image", "label") if k not in features]
        if missing:
            raise DataError(f"tfds dataset {name!r} lacks the feature(s) {missing}: jaxgen needs 'image' and 'label'")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        example = self._source[int(index)]
        image = np.asarray(example["image"], dtype=np.uint8)
        return {"image": adm_center_crop(image, self.image_size), "label": np.int32(example["label"])}

    def __repr__(self):
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)})"


# ---------------------------------------------------------------------------------------------- code cache
#
# A tokenizer's codes of every training image, written by `--mode=cache`, read by `CachedCodesSource`:
#   <key>.npy        (N, ...)  encode(image)[key] for each cache key of the tokenizer (KL-VAE: moments; VQ: indices)
#   <key>_flip.npy   (N, ...)  the same for the horizontally flipped image
#   labels.npy       (N,)      int32
#   meta.json        {"format": "jaxgen-code-cache", "version": 2, "num_examples": N,
#                     "keys": {key: {"shape": [...], "dtype": "..."}}, ...caller's meta}
# meta.json is written last, so a directory without it is an interrupted write.

CACHE_FORMAT = "jaxgen-code-cache"
CACHE_VERSION = 2
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_INT_DTYPES = (np.dtype(np.int16), np.dtype(np.int32))


def _cache_files(keys: Sequence[str]) -> Tuple[str, ...]:
    return tuple(f"{k}{suffix}.npy" for k in keys for suffix in ("", "_flip")) + ("labels.npy",)


class CodeCacheWriter:
    """Writes a code cache incrementally (memory-mapped), for datasets too big to hold in memory.

        w = CodeCacheWriter(dir, num_examples, {"moments": ((h, w, c), np.float32)})
        w.write(indices, codes, codes_flip, labels)   # dicts of arrays; any order, any batch size
        w.finish(meta)                                # writes meta.json
    """

    def __init__(self, directory: str, num_examples: int, specs: Mapping[str, Tuple[Sequence[int], Any]]):
        self.specs = {k: (tuple(int(d) for d in shape), np.dtype(dtype)) for k, (shape, dtype) in specs.items()}
        for k, (_, dtype) in self.specs.items():
            if dtype not in _FLOAT_DTYPES + _INT_DTYPES:
                raise ValueError(f"code cache key {k!r}: dtype must be float16/32 or int16/32, got {dtype}")
        os.makedirs(directory, exist_ok=True)
        meta_path = os.path.join(directory, "meta.json")
        if os.path.exists(meta_path):
            os.remove(meta_path)  # the directory is incomplete until finish()
        self.directory = directory
        self.num_examples = int(num_examples)
        open_mm = np.lib.format.open_memmap
        self._arrays = {}
        for k, (shape, dtype) in self.specs.items():
            for name in (k, f"{k}_flip"):
                self._arrays[name] = open_mm(os.path.join(directory, f"{name}.npy"), "w+", dtype,
                                             (self.num_examples,) + shape)
        self._labels = open_mm(os.path.join(directory, "labels.npy"), "w+", np.int32, (self.num_examples,))
        self._written = np.zeros(self.num_examples, bool)

    def write(self, indices, codes: Mapping[str, Any], codes_flip: Mapping[str, Any], labels) -> None:
        indices = np.asarray(indices)
        for k in self.specs:
            self._arrays[k][indices] = np.asarray(codes[k], self._arrays[k].dtype)
            self._arrays[f"{k}_flip"][indices] = np.asarray(codes_flip[k], self._arrays[k].dtype)
        self._labels[indices] = np.asarray(labels, np.int32)
        self._written[indices] = True

    def finish(self, meta: Optional[Mapping[str, Any]] = None) -> None:
        if not self._written.all():
            raise ValueError(f"code cache incomplete: {int((~self._written).sum())} of {self.num_examples}"
                             " examples were never written")
        for arr in list(self._arrays.values()) + [self._labels]:
            arr.flush()
        record = dict(meta or {})
        record.update(format=CACHE_FORMAT, version=CACHE_VERSION, num_examples=self.num_examples,
                      keys={k: {"shape": list(shape), "dtype": str(dtype)} for k, (shape, dtype) in self.specs.items()})
        tmp = os.path.join(self.directory, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.directory, "meta.json"))
        del self._arrays, self._labels


def write_code_cache(directory: str, codes: Mapping[str, Any], codes_flip: Mapping[str, Any], labels,
                     meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write a whole code cache from in-memory arrays (see the format above)."""
    labels = np.asarray(labels)
    specs = {}
    for k, v in codes.items():
        v, vf = np.asarray(v), np.asarray(codes_flip[k])
        if v.shape != vf.shape or v.shape[:1] != labels.shape:
            raise ValueError(f"code cache shapes disagree for {k!r}: {v.shape}, flipped {vf.shape}, labels "
                             f"{labels.shape}")
        dtype = v.dtype if v.dtype in _FLOAT_DTYPES + _INT_DTYPES else (
            np.float32 if np.issubdtype(v.dtype, np.floating) else np.int32)
        specs[k] = (v.shape[1:], dtype)
    writer = CodeCacheWriter(directory, len(labels), specs)
    writer.write(np.arange(len(labels)), codes, codes_flip, labels)
    writer.finish(meta)


def code_cache_exists(directory: str) -> bool:
    """True when `directory` holds a complete code cache (meta.json is written last)."""
    try:
        read_code_cache_meta(directory)
        return True
    except DataError:
        return False


def read_code_cache_meta(directory: str) -> Dict[str, Any]:
    fix = "write one with --mode=cache and set data.data_dir to it"
    _require_dir(directory, "code cache directory", fix)
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataError(f"code cache {directory!r} has no meta.json (empty or interrupted write): {fix}")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise DataError(f"{meta_path} is not a {CACHE_FORMAT} v{CACHE_VERSION} file: rewrite the cache with --mode=cache")
    missing = [f for f in _cache_files(meta["keys"]) if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise DataError(f"code cache {directory!r} lacks {', '.join(missing)}: rewrite it with --mode=cache")
    return meta


class CachedCodesSource:
    """Reads a code cache directory; arrays are memory-mapped on first access (cheap to pickle to workers).
    Examples: {key: ..., key + '_flip': ... for each cache key, 'label': int32}."""

    def __init__(self, directory: str):
        self.directory = directory
        self.meta = read_code_cache_meta(directory)
        self.keys = tuple(self.meta["keys"])
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            names = [f"{k}{suffix}" for k in self.keys for suffix in ("", "_flip")] + ["labels"]
            self._arrays = {n: np.load(os.path.join(self.directory, f"{n}.npy"), mmap_mode="r") for n in names}
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}  # re-open the memmaps in the worker, do not copy them

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        arrays = self._open()
        index = int(index)
        out = {name: np.asarray(arr[index]) for name, arr in arrays.items() if name != "labels"}
        out["label"] = np.int32(arrays["labels"][index])
        return out

    def __repr__(self):
        return f"CachedCodesSource({self.directory!r}, keys={list(self.keys)}, n={len(self)})"
