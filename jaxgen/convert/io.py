"""Read official checkpoint files into flat `{key: np.ndarray}` state dicts without PyTorch.

Supported: the torch zip serialization (`torch.save` since torch 1.6: `.pth`, `.ckpt`, `.pt`, `.bin`), `.npz` and
`.safetensors`. The torch reader is a restricted unpickler: only whitelisted reconstructions (tensors, storages,
containers, numpy scalars/arrays) are honoured; every other class the pickle names becomes an inert `Stub` that
records its arguments and state. Nothing is imported or called on the file's behalf.

Tensors are rebuilt lazily: unpickling only records (storage, offset, shape, stride, dtype); storage bytes are read
when a selected tensor is materialised, so picking 'model_ema' from a MAR checkpoint never reads the optimizer state.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from jaxgen.errors import CheckpointError

logger = logging.getLogger(__name__)

# First bytes of a legacy (torch < 1.6) file: PROTO 2, then LONG1 of the magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class CheckpointReadError(CheckpointError, ValueError):
    """A checkpoint file is missing, unreadable or lacks the requested entry (one-line message says how to fix)."""


# --------------------------------------------------------------------------------------------------------------
# dtypes


class _TorchDType:
    """A torch dtype as the file names it; `np_dtype` is how its bytes are read, `widen` converts after reading."""

    def __init__(self, name: str, np_dtype: str, widen: Optional[str] = None):
        self.name, self.np_dtype, self.widen = name, np.dtype(np_dtype), widen

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# widen='bf16' / 'f8e4m3' / 'f8e5m2': numpy has no such dtype, so the raw bits are read and converted to float32.
_DTYPES = {d.name: d for d in [
    _TorchDType("float64", "f8"), _TorchDType("float32", "f4"), _TorchDType("float16", "f2"),
    _TorchDType("bfloat16", "u2", "bf16"), _TorchDType("complex64", "c8"), _TorchDType("complex128", "c16"),
    _TorchDType("int64", "i8"), _TorchDType("int32", "i4"), _TorchDType("int16", "i2"), _TorchDType("int8", "i1"),
    _TorchDType("uint8", "u1"), _TorchDType("uint16", "u2"), _TorchDType("uint32", "u4"),
    _TorchDType("uint64", "u8"), _TorchDType("bool", "?"),
    _TorchDType("float8_e4m3fn", "u1", "f8e4m3"), _TorchDType("float8_e5m2", "u1", "f8e5m2"),
]}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
                  "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}
# Legacy typed-storage class names (what `TypedStorage._pickle_storage_type()` writes) -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "LongStorage": "int64",
    "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}


def _torch_dtype(name: str) -> _TorchDType:
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise CheckpointReadError(f"tensor dtype torch.{name} is not supported by jaxgen's checkpoint reader; "
                                  "convert the checkpoint to float32 with torch first")
    return _DTYPES[name]


def _widen(arr: np.ndarray, how: Optional[str]) -> np.ndarray:
    if how is None:
        return arr
    if how == "bf16":  # bfloat16 is the high half of a float32
        return np.asarray(arr.astype(np.uint32) << 16).view(np.float32)
    import ml_dtypes  # jax dependency; only float8 checkpoints need it

    f8 = {"f8e4m3": ml_dtypes.float8_e4m3fn, "f8e5m2": ml_dtypes.float8_e5m2}[how]
    return arr.view(f8).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# objects the unpickler builds


class _StorageType:
    """Stands for `torch.FloatStorage` etc. in a persistent id."""

    def __init__(self, name: str, dtype: _TorchDType):
        self.name, self.dtype = name, dtype


class _Storage:
    """One `data/<key>` record of the archive: `numel` elements of `dtype` (bytes are read on demand)."""

    def __init__(self, archive: "_TorchArchive", key: str, dtype: _TorchDType, numel: int):
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel


class LazyTensor:
    """A tensor recorded during unpickling; `materialize()` reads its storage and returns a contiguous array."""

    def __init__(self, storage: _Storage, offset: int, shape: Tuple[int, ...], stride: Tuple[int, ...],
                 dtype: _TorchDType):
        if len(shape) != len(stride) or any(d < 0 for d in shape) or any(s < 0 for s in stride) or offset < 0:
            raise CheckpointReadError(f"corrupt tensor record (shape {shape}, stride {stride}, offset {offset}) "
                                      f"in {storage.archive.path}; re-download the checkpoint")
        self.storage, self.offset, self.shape, self.stride, self.dtype = storage, offset, shape, stride, dtype

    def materialize(self) -> np.ndarray:
        return self.storage.archive.tensor(self)

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype!r}, shape={self.shape})"


class Stub:
    """Inert stand-in for a class the reader does not reconstruct (argparse.Namespace, optimizer objects, ...).

    Keeps what the pickle gave it: `stub_args` (constructor arguments), `stub_state` (from BUILD; a dict state is
    also exposed as attributes, so `ckpt['args'].lr` works), `stub_items` / `stub_list` (SETITEMS / APPENDS).
    """

    _stub_module = "?"
    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.__dict__.update(_stub_args=args, _stub_state=None, _stub_items={}, _stub_list=[])
        return self

    def __init__(self, *args, **kwargs):
        pass

    @property
    def stub_class(self) -> str:
        return f"{self._stub_module}.{self._stub_name}"

    @property
    def stub_args(self) -> tuple:
        return self.__dict__["_stub_args"]

    @property
    def stub_state(self) -> Any:
        return self.__dict__["_stub_state"]

    @property
    def stub_items(self) -> dict:
        return self.__dict__["_stub_items"]

    @property
    def stub_list(self) -> list:
        return self.__dict__["_stub_list"]

    def __setstate__(self, state):
        self.__dict__["_stub_state"] = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = state[0]  # (dict_state, slots_state)
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str) and not k.startswith("_stub_"):
                    self.__dict__[k] = v

    # SETITEMS / APPENDS target dict or list subclasses: record rather than fail.
    def __setitem__(self, key, value):
        self.__dict__["_stub_items"][key] = value

    def append(self, value):
        self.__dict__["_stub_list"].append(value)

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<Stub {self.stub_class}>"


_stub_classes: Dict[Tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (str(module), str(name))
    if key not in _stub_classes:
        _stub_classes[key] = type(f"Stub[{key[0]}.{key[1]}]", (Stub,),
                                  {"_stub_module": key[0], "_stub_name": key[1]})
    return _stub_classes[key]


def _unsupported_tensor(kind: str):
    def build(*args, **kwargs):
        logger.warning("checkpoint holds a %s tensor, which jaxgen does not read; it is dropped", kind)
        return _stub_class("torch._utils", kind)(*args)
    return build


# --------------------------------------------------------------------------------------------------------------
# torch zip archive


class _TorchArchive:
    """An open torch zip checkpoint: unpickles `<root>/data.pkl` and serves storage records."""

    def __init__(self, path: str, fileobj: Optional[io.BytesIO] = None):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(fileobj if fileobj is not None else path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointReadError(f"cannot read {path} as a zip archive ({e}); the file may be truncated or "
                                      "corrupt: re-download it") from None
        names = self.zip.namelist()
        pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pkls) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise CheckpointReadError(f"{path} is a TorchScript archive (torch.jit.save), not a state dict; "
                                          "save `model.state_dict()` with torch.save instead")
            raise CheckpointReadError(f"{path} is a zip file but not a torch checkpoint (expected one "
                                      f"'<root>/data.pkl', found {len(pkls)}); pass a file written by torch.save")
        self.prefix = pkls[0][: -len("data.pkl")]
        byteorder = self._record_or_none("byteorder")
        # torch treats a missing byte-order record as little endian.
        self.byteorder = (byteorder or b"little").decode("ascii", "replace").strip()
        if self.byteorder not in ("little", "big"):
            raise CheckpointReadError(f"{path}: unknown byte order {self.byteorder!r}; re-save the checkpoint")
        self._cache_key: Optional[str] = None
        self._cache: Optional[np.ndarray] = None

    def _record_or_none(self, name: str) -> Optional[bytes]:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            return None

    def load(self) -> Any:
        data = self.zip.read(self.prefix + "data.pkl")
        return _Unpickler(io.BytesIO(data), self).load()

    def storage_array(self, storage: _Storage) -> np.ndarray:
        """The storage's elements as a read-only 1-D array in file byte order (last one cached: views share it)."""
        if self._cache_key != storage.key:
            raw = self._record_or_none(f"data/{storage.key}")
            if raw is None:
                raise CheckpointReadError(f"{self.path} lacks storage record data/{storage.key}; the checkpoint is "
                                          "incomplete: re-download it")
            nbytes = storage.numel * storage.dtype.itemsize
            if len(raw) < nbytes:
                raise CheckpointReadError(f"{self.path}: storage data/{storage.key} has {len(raw)} bytes, expected "
                                          f"{nbytes}; the checkpoint is truncated: re-download it")
            order = "<" if self.byteorder == "little" else ">"
            self._cache = np.frombuffer(raw, dtype=storage.dtype.np_dtype.newbyteorder(order), count=storage.numel)
            self._cache_key = storage.key
        return self._cache

    def tensor(self, t: LazyTensor) -> np.ndarray:
        st = t.storage
        flat = self.storage_array(st)
        if t.dtype is not st.dtype:
            # v3 tensors (uint16, float8, ...) sit on an untyped byte storage: reinterpret it at the tensor's dtype.
            raw = flat.view(np.uint8)
            usable = raw.shape[0] // t.dtype.itemsize * t.dtype.itemsize
            order = "<" if self.byteorder == "little" else ">"
            flat = raw[:usable].view(t.dtype.np_dtype.newbyteorder(order))
        n = int(np.prod(t.shape, dtype=np.int64))
        if n == 0:
            out = np.zeros(t.shape, t.dtype.np_dtype)
        else:
            last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
            if last >= flat.shape[0]:
                raise CheckpointReadError(
                    f"{self.path}: a tensor of shape {t.shape} reads past its storage data/{st.key} "
                    f"({last + 1} > {flat.shape[0]} elements); the checkpoint is corrupt: re-download it")
            item = flat.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.shape,
                                                   strides=[s * item for s in t.stride], writeable=False)
            out = np.array(view, dtype=t.dtype.np_dtype, order="C")  # copy: own, contiguous, native order
        return _widen(out, t.dtype.widen)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, _Storage):
        return _stub_class("torch._utils", "_rebuild_tensor")(storage, offset, size, stride, *rest)
    return LazyTensor(storage, int(offset), tuple(int(d) for d in size), tuple(int(s) for s in stride), storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDType):
        return _stub_class("torch._utils", "_rebuild_tensor_v3")(storage, offset, size, stride)
    return LazyTensor(storage, int(offset), tuple(int(d) for d in size), tuple(int(s) for s in stride), dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # a Parameter is its data for our purposes


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses: rebuild the plain tensor with the (already whitelisted) inner function; drop the type.
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); nothing else is honoured.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        return _stub_class("_codecs", "encode")(text, encoding)
    return text.encode("latin1")


def _torch_device(kind, index=None):
    return str(kind) if index is None else f"{kind}:{index}"


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        return _stub_class("numpy", "scalar")(dtype, data)
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _np_reconstruct(cls, shape, typecode):
    # numpy's ndarray reduction: an empty array whose __setstate__ (numpy's own, data only) then fills it in.
    if tuple(shape) != (0,):
        return _stub_class("numpy.core.multiarray", "_reconstruct")(shape, typecode)
    return np.ndarray((0,), np.uint8)


def _np_dtype(spec, align=False, copy=False):
    return np.dtype(spec, align, copy)


# Constructors that cannot run code or allocate unboundedly from a small pickle.
_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex, "int": int,
                  "float": float, "bool": bool, "str": str, "tuple": tuple, "list": list, "dict": dict}
_TORCH_REBUILDS = {
    "_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor, "_rebuild_tensor_v3":
    _rebuild_tensor_v3, "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Whitelisting unpickler for torch's data.pkl: see module docstring."""

    def __init__(self, f, archive: _TorchArchive):
        super().__init__(f, encoding="utf-8")
        self.archive = archive
        self.storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch.tensor":  # renamed module (torch 1.8)
            module = "torch._tensor"
        if module == "torch._utils":
            if name in _TORCH_REBUILDS:
                return _TORCH_REBUILDS[name]
            if name.startswith("_rebuild_"):
                return _unsupported_tensor(name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module in ("torch", "torch.storage") and name.endswith("Storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _torch_dtype(_STORAGE_DTYPES[name]))
        if module == "torch":
            if name in _DTYPES or name in _DTYPE_ALIASES:
                return _torch_dtype(name)
            if name == "Size":
                return tuple
            if name == "device":
                return _torch_device
            if name in ("strided", "sparse_coo", "sparse_csr", "_mkldnn"):
                return f"torch.{name}"
        if module == "torch.serialization" and name == "_get_layout":
            return str
        if module == "torch.storage" and name == "_load_from_bytes":
            return self._load_from_bytes
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "scalar":
                return _np_scalar
            if name == "_reconstruct":
                return _np_reconstruct
        if module == "numpy" and name == "dtype":
            return _np_dtype
        return _stub_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):  # e.g. quantized storages: their tensors are dropped
            return _stub_class("torch", "UnknownStorage")(storage_type, key, numel)
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(self.archive, key, storage_type.dtype, int(numel))
        return self.storages[key]

    def _load_from_bytes(self, data):
        # A storage pickled outside torch.save holds a whole nested torch.save archive.
        if isinstance(data, (bytes, bytearray)) and bytes(data[:4]) == b"PK\x03\x04":
            return _TorchArchive(f"{self.archive.path}[nested]", io.BytesIO(bytes(data))).load()
        return _stub_class("torch.storage", "_load_from_bytes")(data)


# --------------------------------------------------------------------------------------------------------------
# other formats


_SAFETENSORS_WIDEN = {"BF16": ("<u2", "bf16"), "F8_E4M3": ("u1", "f8e4m3"), "F8_E5M2": ("u1", "f8e5m2")}


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    out: Dict[str, np.ndarray] = {}
    widen = {}
    with safe_open(path, framework="np") as f:
        for k in f.keys():
            dt = f.get_slice(k).get_dtype()
            if dt in _SAFETENSORS_WIDEN:
                widen[k] = dt
            else:
                out[k] = f.get_tensor(k)
    if widen:
        # safetensors.numpy has no bfloat16/float8: read those tensors' bytes at the header's offsets.
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
            for k, dt in widen.items():
                start, end = header[k]["data_offsets"]
                fh.seek(8 + hlen + start)
                raw_dtype, how = _SAFETENSORS_WIDEN[dt]
                native = np.dtype(raw_dtype).newbyteorder("=")
                bits = np.frombuffer(fh.read(end - start), dtype=raw_dtype).astype(native)
                out[k] = _widen(bits, how).reshape(header[k]["shape"])
    return {k: out[k] for k in sorted(out)}


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------------------------
# public API


def _sniff(path: str) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    if len(head) >= 9:
        (hlen,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < hlen < os.path.getsize(path):
            return "safetensors"
    if (head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC[2:]) or _is_tar(path):
        return "legacy"
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):  # a msgpack map: flax serialization
        return "msgpack"
    return "unknown"


def _read_msgpack(path: str) -> Any:
    """A flax `serialization.to_bytes` file (the original MaskGIT checkpoints): nested dict of numpy arrays."""
    from flax import serialization

    with open(path, "rb") as fh:
        return serialization.msgpack_restore(fh.read())


def _is_tar(path: str) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _open(path) -> Tuple[Any, Optional[_TorchArchive]]:
    """(tree with LazyTensor leaves for torch files, the open archive or None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointReadError(f"checkpoint file not found: {path}; check the path")
    if os.path.isdir(path):
        raise CheckpointReadError(f"checkpoint path is a directory: {path}; pass the checkpoint file inside it")
    try:
        kind = _sniff(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointReadError(f"cannot read checkpoint {path} ({e}); check the file is complete") from None
    if kind == "legacy":
        raise CheckpointReadError(
            f"{path} uses PyTorch's legacy (pre-1.6) serialization, which jaxgen cannot read without torch; "
            "re-save it with a recent torch: torch.save(torch.load(p, map_location='cpu'), new_path)")
    if kind == "unknown":
        raise CheckpointReadError(f"{path} is not a torch (.pth/.ckpt/.pt/.bin), .npz, .safetensors or flax msgpack "
                                  "checkpoint; convert it to one of those")
    try:
        if kind == "npz":
            return _read_npz(path), None
        if kind == "safetensors":
            return _read_safetensors(path), None
        if kind == "msgpack":
            return _read_msgpack(path), None
        archive = _TorchArchive(path)
        return archive.load(), archive
    except CheckpointReadError:
        raise
    except Exception as e:  # any parse failure of a damaged file reads as one line
        raise CheckpointReadError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); the file "
                                  "may be truncated or corrupt: re-download it") from None


def load_checkpoint(path) -> Any:
    """The whole object stored in `path` (nested dicts, lists, `Stub`s for other classes, numbers), with every
    tensor read as an array: for inspecting e.g. MAR's 'args' or 'epoch'. Reads all tensors, optimizer state too."""
    tree, archive = _open(path)
    with _reading(path, archive):
        return _materialize_tree(tree)


@contextlib.contextmanager
def _reading(path: str, archive: Optional[_TorchArchive]):
    """Reading tensor bytes: closes the archive after, and turns a damaged record's error into one line."""
    try:
        yield
    except CheckpointReadError:
        raise
    except Exception as e:
        raise CheckpointReadError(f"cannot read tensor data of {os.fspath(path)} ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the file may be corrupt: re-download it") from None
    finally:
        if archive is not None:
            archive.zip.close()


def _materialize_tree(obj: Any) -> Any:
    if isinstance(obj, LazyTensor):
        return obj.materialize()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize_tree(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_materialize_tree(v) for v in obj)
    if isinstance(obj, Stub):
        for k, v in list(obj.__dict__.items()):
            obj.__dict__[k] = _materialize_tree(v)
        return obj
    return obj


def _is_array(v: Any) -> bool:
    return isinstance(v, LazyTensor) or (isinstance(v, np.ndarray) and not v.dtype.hasobject)


def _flatten(node: Mapping, prefix: str, out: Dict[str, Any]) -> None:
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten(v, key + ".", out)
        elif _is_array(v):
            if key in out:
                raise CheckpointReadError(f"checkpoint key {key!r} occurs twice after flattening nested dicts")
            out[key] = v


def _top_keys(tree: Mapping) -> str:
    keys = [str(k) for k in tree.keys()]
    return ", ".join(repr(k) for k in keys[:20]) + (f", ... ({len(keys)} keys)" if len(keys) > 20 else "")


def _select(tree: Any, select: Optional[str], path: str) -> Tuple[Mapping, str]:
    if not isinstance(tree, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(tree).__name__}, not a dict of tensors; save a state dict "
                                  "(model.state_dict()) instead")
    if select is not None:
        if select in tree:
            node = tree[select]
        else:
            node = tree
            for part in select.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
                if node is None:
                    break
            if node is None:
                # A flat file (npz/safetensors) of a nested checkpoint: select by key prefix.
                pre = select + "."
                flat = {k[len(pre):]: v for k, v in tree.items() if isinstance(k, str) and k.startswith(pre)}
                if not flat:
                    raise CheckpointReadError(f"{path} has no entry {select!r}; available top-level keys: "
                                              f"{_top_keys(tree)}")
                node = flat
        if not isinstance(node, Mapping):
            raise CheckpointReadError(f"entry {select!r} of {path} is a {type(node).__name__}, not a dict of "
                                      f"tensors; pick one of: {_top_keys(tree)}")
        return node, select
    if any(_is_array(v) for v in tree.values()):
        return tree, ""
    for name in ("model", "state_dict"):
        if isinstance(tree.get(name), Mapping):
            logger.info("%s: using its %r entry (top-level keys: %s); pass select=... for another", path, name,
                        _top_keys(tree))
            return tree[name], name
    logger.info("%s: no 'model' or 'state_dict' entry; using every tensor in it (top-level keys: %s)", path,
                _top_keys(tree))
    return tree, ""


def load_state_dict(path, select: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Flat `{dotted key: np.ndarray}` from a torch zip checkpoint, `.npz` or `.safetensors` file, without torch.

    `select` picks a sub-dict of a nested checkpoint ('model', 'model_ema', 'state_dict', or a dotted path); when
    None a flat state dict is used as is, else 'model' then 'state_dict' (logged). Nested dicts are flattened with
    '.', non-array leaves dropped; bfloat16/float8 become float32, other dtypes are kept.
    """
    path = os.fspath(path)
    tree, archive = _open(path)
    with _reading(path, archive):
        node, chosen = _select(tree, select, path)
        lazy: Dict[str, Any] = {}
        _flatten(node, "", lazy)
        if not lazy:
            where = f"entry {chosen!r} of {path}" if chosen else path
            raise CheckpointReadError(f"no tensors in {where}; available top-level keys: {_top_keys(tree)}")
        # Read storages in key order so tensors viewing one storage reuse the archive's one-record cache.
        order = sorted(lazy, key=lambda k: (lazy[k].storage.key, k) if isinstance(lazy[k], LazyTensor) else ("", k))
        out = {k: lazy[k].materialize() if isinstance(lazy[k], LazyTensor) else lazy[k] for k in order}
    return {k: out[k] for k in lazy}  # file order


def save_npz_state_dict(path, sd: Mapping[str, np.ndarray]) -> None:
    """Write a flat state dict as an uncompressed `.npz` (readable with `np.load` and `load_state_dict`)."""
    path = os.fspath(path)
    bad = [k for k, v in sd.items() if not isinstance(v, (np.ndarray, np.generic, int, float, bool))]
    if bad:
        raise CheckpointReadError(f"cannot save non-array entries {bad[:5]} to {path}; pass a flat dict of arrays")
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    # Written member by member (as np.savez does) so keys such as 'file' cannot clash with np.savez's arguments.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, v in sd.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(v), allow_pickle=False)
