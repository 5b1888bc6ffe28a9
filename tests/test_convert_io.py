"""jaxgen.convert.io: torch-free reading of torch zip checkpoints, .npz and .safetensors files."""
import argparse
import collections
import json
import logging
import pickle
import struct
import zipfile

import numpy as np
import pytest

from jaxgen.convert import io as cio
from jaxgen.errors import CheckpointError
from tests import torch_format as tf

# float32 values exactly representable in bfloat16, so the expected result is the value itself.
BF16_VALUES = np.array([[1.0, -2.5, 0.15625], [2.0 ** 127, -0.0, -7.0]], np.float32)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _mar_like():
    """A checkpoint shaped like MAR's checkpoint-last.pth, with every tensor flavour the reader must handle."""
    rng = np.random.default_rng(0)
    w = tf.Tensor.of(rng.standard_normal((3, 4)).astype(np.float32))
    flat = tf.Tensor.of(np.arange(12, dtype=np.float32))
    model = collections.OrderedDict([
        ("blocks.0.weight", w),
        ("blocks.0.weight_t", w.t()),  # non-contiguous view of w's storage
        ("pos", flat),
        ("pos_window", flat.view_of(5, (2, 3), (3, 1))),  # same storage, offset 5
        ("half", tf.Tensor.of(rng.standard_normal((2, 3)).astype(np.float16))),
        ("bf", tf.Tensor.of(_bf16_bits(BF16_VALUES), "bfloat16")),
        ("bf_t", tf.Tensor.of(_bf16_bits(BF16_VALUES), "bfloat16").t()),
        ("steps", tf.Tensor.of(np.array([7, -1, 2 ** 40], np.int64))),
        ("mask", tf.Tensor.of(np.array([[True, False], [False, True]]))),
        ("scalar", tf.Tensor.of(np.array(2.5, np.float32))),
        ("empty", tf.Tensor.of(np.zeros((0, 3), np.float32))),
        ("codes", tf.Tensor.of(np.array([0, 1, 65535], np.uint16))),  # v3: untyped storage + dtype
        ("param", tf.Parameter(tf.Tensor.of(np.full((2,), 0.5, np.float32)))),
    ])
    model._metadata = collections.OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() sets it
    ema = collections.OrderedDict([("blocks.0.weight", tf.Tensor.of(np.ones((3, 4), np.float32)))])
    opt_state = {"state": {0: {"step": tf.Tensor.of(np.array(10.0, np.float32)),
                               "exp_avg": tf.Tensor.of(np.zeros((3, 4), np.float32))}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
    args = argparse.Namespace(model="mar_base", lr=np.float64(1e-4), img_size=256, betas=(0.9, 0.95))
    ckpt = {"model": model, "model_ema": ema, "optimizer": opt_state, "args": args, "epoch": 3}
    return ckpt


def _expected(sd):
    out = {}
    for k, t in sd.items():
        t = t.data if isinstance(t, tf.Parameter) else t
        a = t.numpy()
        if t.storage.dtype == "bfloat16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[k] = a
    return out


def _assert_same(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture
def mar_ckpt(tmp_path):
    ckpt = _mar_like()
    path = tmp_path / "checkpoint-last.pth"
    tf.save(ckpt, str(path))
    return ckpt, path


def test_torch_checkpoint_exact_arrays(mar_ckpt, caplog):
    ckpt, path = mar_ckpt
    with caplog.at_level(logging.INFO, logger="jaxgen.convert.io"):
        sd = cio.load_state_dict(path)
    assert "'model'" in caplog.text  # auto-pick says which entry it used
    want = _expected(ckpt["model"])
    _assert_same(sd, want)
    np.testing.assert_array_equal(sd["bf"], BF16_VALUES)
    np.testing.assert_array_equal(sd["bf_t"], BF16_VALUES.T)
    np.testing.assert_array_equal(sd["pos_window"], np.arange(5, 11, dtype=np.float32).reshape(2, 3))
    assert sd["steps"][2] == 2 ** 40 and sd["codes"][2] == 65535
    for a in sd.values():  # writable, contiguous copies, independent even where torch tensors shared a storage
        assert a.flags.c_contiguous and a.flags.writeable
    assert not np.shares_memory(sd["pos"], sd["pos_window"])
    assert not np.shares_memory(sd["blocks.0.weight"], sd["blocks.0.weight_t"])


def test_select_ema_and_lazy_storages(mar_ckpt, monkeypatch):
    ckpt, path = mar_ckpt
    read = []
    orig = cio._TorchArchive.storage_array
    monkeypatch.setattr(cio._TorchArchive, "storage_array", lambda self, st: read.append(st.key) or orig(self, st))
    sd = cio.load_state_dict(str(path), select="model_ema")
    _assert_same(sd, _expected(ckpt["model_ema"]))
    assert len(set(read)) == 1  # only the EMA tensor's storage was read, not the model's or the optimizer's


def test_load_checkpoint_keeps_other_objects_as_stubs(mar_ckpt):
    _, path = mar_ckpt
    full = cio.load_checkpoint(path)
    assert full["epoch"] == 3
    args = full["args"]
    assert isinstance(args, cio.Stub) and args.stub_class == "argparse.Namespace"
    assert args.model == "mar_base" and args.img_size == 256 and args.betas == (0.9, 0.95)
    assert args.lr == 1e-4 and isinstance(args.lr, np.float64)  # numpy scalar rebuilt via the whitelist
    assert full["optimizer"]["param_groups"][0]["lr"] == 1e-4
    np.testing.assert_array_equal(full["optimizer"]["state"][0]["step"], np.float32(10.0))
    assert isinstance(full["model"], collections.OrderedDict)


def test_big_endian_file(tmp_path):
    ckpt = _mar_like()
    path = tmp_path / "be.pth"
    tf.save(ckpt, str(path), byteorder="big")
    _assert_same(cio.load_state_dict(path), _expected(ckpt["model"]))


def test_flat_state_dict_and_state_dict_key_and_flattening(tmp_path, caplog):
    a = tf.Tensor.of(np.arange(6, dtype=np.float32).reshape(2, 3))
    b = tf.Tensor.of(np.array([1, 2], np.int32))
    tf.save(collections.OrderedDict([("w", a), ("n", b)]), str(tmp_path / "flat.pth"))
    sd = cio.load_state_dict(tmp_path / "flat.pth")
    _assert_same(sd, {"w": a.numpy(), "n": b.numpy()})

    buf = np.arange(3.0)  # a numpy array pickled into the checkpoint counts as an array
    nested = {"state_dict": {"enc": {"w": a, "note": "text", "count": 4, "tags": np.array(["x", 1], dtype=object)},
                             "dec.n": b, "np_buf": buf}, "global_step": 9}
    tf.save(nested, str(tmp_path / "lightning.ckpt"))
    with caplog.at_level(logging.INFO, logger="jaxgen.convert.io"):
        sd = cio.load_state_dict(tmp_path / "lightning.ckpt")
    assert "'state_dict'" in caplog.text
    # nested dicts joined by '.'; non-array leaves (text, numbers, object arrays) dropped
    _assert_same(sd, {"enc.w": a.numpy(), "dec.n": b.numpy(), "np_buf": buf})
    _assert_same(cio.load_state_dict(tmp_path / "lightning.ckpt", select="state_dict.enc"), {"w": a.numpy()})


def test_nested_storage_from_bytes(tmp_path):
    # A storage pickled outside torch.save carries a whole torch.save archive of itself.
    storage = tf.Storage(np.arange(4, dtype=np.float32), "float32")
    inner = tf.save_bytes(storage)
    ckpt = {"model": {"w": _TensorOnCall(tf.Call("torch.storage", "_load_from_bytes", inner), (2, 2), (2, 1))}}
    tf.save(ckpt, str(tmp_path / "nested.pth"))
    sd = cio.load_state_dict(tmp_path / "nested.pth")
    np.testing.assert_array_equal(sd["w"], np.arange(4, dtype=np.float32).reshape(2, 2))


class _TensorOnCall:
    """A tensor whose storage is produced by a reduction (used for _load_from_bytes)."""

    def __init__(self, storage_call, shape, stride):
        self.storage_call, self.shape, self.stride = storage_call, shape, stride

    def __reduce_ex__(self, protocol):
        return (tf.glob("torch._utils", "_rebuild_tensor_v2"),
                (self.storage_call, 0, self.shape, self.stride, False, collections.OrderedDict()))


def test_unknown_callables_are_never_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = {"model": {"w": tf.Tensor.of(np.ones(2, np.float32))},
            "evil": tf.Call("os", "system", f"touch {marker}"),
            "evil2": tf.Call("builtins", "eval", f"open({str(marker)!r}, 'w')"),
            "evil3": tf.Call("builtins", "getattr", 1, "__class__")}
    tf.save(ckpt, str(tmp_path / "evil.pth"))
    sd = cio.load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    np.testing.assert_array_equal(sd["w"], np.ones(2, np.float32))
    full = cio.load_checkpoint(tmp_path / "evil.pth")
    assert isinstance(full["evil"], cio.Stub) and full["evil"].stub_class == "os.system"
    assert full["evil"].stub_args == (f"touch {marker}",)
    assert isinstance(full["evil2"], cio.Stub) and isinstance(full["evil3"], cio.Stub)
    assert not marker.exists()


def test_npz_roundtrip_and_prefix_select(tmp_path):
    sd = {"model.w": np.arange(6, dtype=np.float32).reshape(2, 3), "model.file": np.array([1, 2], np.int64),
          "model_ema.w": np.ones((2, 3), np.float16), "flag": np.array(True)}
    cio.save_npz_state_dict(tmp_path / "sub" / "w.npz", sd)
    _assert_same(cio.load_state_dict(tmp_path / "sub" / "w.npz"), sd)
    with np.load(tmp_path / "sub" / "w.npz") as z:  # a plain npz for numpy too
        np.testing.assert_array_equal(z["model.file"], sd["model.file"])
    got = cio.load_state_dict(tmp_path / "sub" / "w.npz", select="model")
    _assert_same(got, {"w": sd["model.w"], "file": sd["model.file"]})
    with pytest.raises(ValueError, match="non-array"):
        cio.save_npz_state_dict(tmp_path / "bad.npz", {"a": "text"})


def test_safetensors(tmp_path):
    from safetensors.numpy import save_file

    sd = {"a.weight": np.arange(6, dtype=np.float32).reshape(3, 2), "a.idx": np.array([3, 1], np.int64),
          "h": np.ones(4, np.float16)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    got = cio.load_state_dict(tmp_path / "m.safetensors")
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(got[k], sd[k])

    # bfloat16 (which safetensors.numpy cannot decode) next to float32, written per the format spec.
    bits = _bf16_bits(BF16_VALUES).astype("<u2").tobytes()
    f32 = np.arange(3, dtype="<f4").tobytes()
    header = {"bf": {"dtype": "BF16", "shape": list(BF16_VALUES.shape), "data_offsets": [0, len(bits)]},
              "f": {"dtype": "F32", "shape": [3], "data_offsets": [len(bits), len(bits) + len(f32)]},
              "__metadata__": {"format": "pt"}}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    (tmp_path / "bf.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + bits + f32)
    got = cio.load_state_dict(tmp_path / "bf.safetensors")
    assert got["bf"].dtype == np.float32
    np.testing.assert_array_equal(got["bf"], BF16_VALUES)
    np.testing.assert_array_equal(got["f"], np.arange(3, dtype=np.float32))


# ----------------------------------------------------------------------------------------------------------------
# errors: ValueError (and jaxgen's CheckpointError), one line, naming the problem and the fix


def _error(path, **kw) -> str:
    with pytest.raises(ValueError) as info:
        cio.load_state_dict(path, **kw)
    assert isinstance(info.value, CheckpointError)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.pth")
    assert "not found" in msg and "nope.pth" in msg


def test_error_select_missing_lists_keys(mar_ckpt):
    _, path = mar_ckpt
    msg = _error(path, select="ema")
    assert "'ema'" in msg and "'model'" in msg and "'model_ema'" in msg and "'args'" in msg
    msg = _error(path, select="epoch")
    assert "not a dict of tensors" in msg
    msg = _error(path, select="args")  # a Namespace stub holds no tensors either
    assert "'args'" in msg


def test_error_unreadable_files(tmp_path, mar_ckpt):
    _, path = mar_ckpt
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    assert "not a torch" in _error(junk)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "corrupt" in _error(truncated) or "truncated" in _error(truncated)

    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hello")
    assert "not a torch checkpoint" in _error(other_zip)

    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as z:
        z.writestr("m/data.pkl", b"")
        z.writestr("m/constants.pkl", b"")
        z.writestr("n/data.pkl", b"")
    assert "TorchScript" in _error(script)


def test_error_corrupt_tensor_record(tmp_path):
    st = tf.Tensor.of(np.arange(4, dtype=np.float32))
    tf.save({"w": st.view_of(2, (2, 2), (2, 1))}, str(tmp_path / "bad.pth"))  # reads elements 2..5 of 4
    assert "past its storage" in _error(tmp_path / "bad.pth")


def test_error_legacy_format(tmp_path):
    legacy = tmp_path / "old.pth"
    # torch<1.6 files open with the pickled magic number, protocol version and system info.
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    msg = _error(legacy)
    assert "legacy" in msg and "re-save" in msg
