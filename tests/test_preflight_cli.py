"""Every stage is checked before any work (issue 9): one `jaxgen: error:` line within seconds, nothing else printed,
a non-zero exit, nothing overwritten; the key a data error names is the one that fixes it; paper configs start from
the official tokenizer."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cli_utils import REPO, TINY_VAE, assert_one_line_error, env, run_main, tail

MAR_TINY = ["--config=configs/mar_tiny.py:runlocal"]


def _image_folder(root):
    from PIL import Image

    os.makedirs(root / "n01", exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((300, 280, 3)) * 255).astype(np.uint8)).save(root / "n01" / "a.png")
    return root


def test_a_stage2_error_stops_a_two_stage_run_before_stage1(tmp_path):
    """8 devices, batch 12: MAR's batch does not split, found before the KL-VAE stage trains (seconds, not minutes)."""
    t0 = time.time()
    proc = run_main([*MAR_TINY, f"--workdir={tmp_path / 'w'}", "--config.batch_size=12"], devices=8)
    assert_one_line_error(proc, "config.batch_size 12", "multiple of 8")
    assert time.time() - t0 < 30
    assert not os.path.exists(tmp_path / "w" / "tokenizer" / "checkpoints")


def test_a_stage1_error_names_the_tokenizer_key(tmp_path):
    proc = run_main([*MAR_TINY, f"--workdir={tmp_path / 'w'}", "--config.tokenizer.config.batch_size=12"], devices=8)
    assert_one_line_error(proc, "config.tokenizer.config.batch_size 12", "--config.tokenizer.config.batch_size")


def test_the_data_key_the_error_names_fixes_it_for_both_stages(tmp_path):
    """mar_b:folder names data.data_dir; setting it through that flag is read by the tokenizer stage too (one
    dataset), so the run moves on to its next check: the paper config wants the official tokenizer."""
    workdir = f"--workdir={tmp_path / 'w'}"
    proc = run_main(["--config=configs/mar_b.py:folder", workdir])
    line = assert_one_line_error(proc, "data.data_dir")
    key = line.split("set ", 1)[1].split(" ", 1)[0]
    assert key == "data.data_dir"
    proc = run_main(["--config=configs/mar_b.py:folder", workdir, f"--config.{key}={_image_folder(tmp_path / 'imgs')}"])
    assert_one_line_error(proc, "--family=kl_vae", "kl16.ckpt", "--config.tokenizer.checkpoint", ":train_tokenizer")


def test_tfds_data_dir_is_the_users(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    proc = run_main(["--config=configs/mar_l.py", f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={data_dir}"])
    assert_one_line_error(proc, "imagenet2012", f"not prepared in '{data_dir}", f"data.data_dir={data_dir}")


def test_paper_var_config_wants_the_official_vqvae(tmp_path):
    proc = run_main(["--config=configs/var_d16.py:folder", f"--workdir={tmp_path / 'w'}",
                     f"--config.data.data_dir={_image_folder(tmp_path / 'imgs')}"])
    assert_one_line_error(proc, "--family=msvq", "vae_ch160v4096z32.pth", "--config.tokenizer.checkpoint")
    proc = run_main(["--config=configs/var_d16.py:folder", f"--workdir={tmp_path / 'w'}",
                     f"--config.data.data_dir={tmp_path / 'imgs'}", f"--config.tokenizer.checkpoint={tmp_path}"])
    assert_one_line_error(proc, "config.tokenizer.checkpoint", "not a jaxgen params checkpoint")


@pytest.mark.parametrize("case", ["missing_file", "broken_file", "unknown_variant", "wrong_type", "unknown_mode",
                                  "no_workdir", "unwritable_workdir", "bad_value", "mesh_product",
                                  "missing_tokenizer_checkpoint"])
def test_bad_input_is_one_line(tmp_path, case):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    (tmp_path / "a_file").write_text("")
    w = f"--workdir={tmp_path / 'w'}"
    args, needles = {
        "missing_file": (["--config=configs/mar_tny.py", w], ["configs/mar_tny.py", "does not exist"]),
        "broken_file": ([f"--config={broken}", w], ["cannot load the config", "broken.py"]),
        "unknown_variant": (["--config=configs/mar_tiny.py:fast", w], ["unknown variant 'fast'", "runlocal"]),
        "wrong_type": ([*MAR_TINY, w, "--config.total_steps=many"], ["total_steps", "many"]),
        "unknown_mode": ([*MAR_TINY, w, "--mode=fit"], ["--mode=fit", "train"]),
        "no_workdir": ([*MAR_TINY], ["--workdir is required"]),
        "unwritable_workdir": ([*MAR_TINY, f"--workdir={tmp_path / 'a_file' / 'w'}"], ["not writable"]),
        "bad_value": ([*MAR_TINY, w, "--config.optim.schedule=cosin"], ["optim.schedule", "cosin"]),
        "mesh_product": ([*MAR_TINY, w, "--config.mesh.shape=(2,1,1)"], ["mesh.shape", "1 are present"]),
        "missing_tokenizer_checkpoint": ([*MAR_TINY, w, f"--config.tokenizer.checkpoint={tmp_path / 'kl16'}"],
                                         ["tokenizer checkpoint", "does not exist", "python -m jaxgen.convert"]),
    }[case]
    assert_one_line_error(run_main(args), *needles)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            h.update(os.path.join(dirpath, name).encode())
            h.update(open(os.path.join(dirpath, name), "rb").read())
    return h.hexdigest()


def test_sampling_a_mismatched_checkpoint_prints_one_line(tmp_path):
    """A kl_vae run sampled as if it were MAR's: no orbax warnings, one line (--verbosity=1 shows the library logs)."""
    w = tmp_path / "w"
    proc = run_main([*TINY_VAE, f"--workdir={w}", "--config.total_steps=2", "--config.checkpoint_every=2"])
    assert proc.returncode == 0, tail(proc)
    before = _digest(w)
    sample = ["--config=configs/mar_tiny.py", f"--workdir={w}", "--mode=sample", f"--config.tokenizer.workdir={w}"]
    assert_one_line_error(run_main(sample), "checkpoint")
    assert _digest(w) == before
    verbose = run_main([*sample, "--verbosity=1"])
    assert verbose.returncode != 0 and len(verbose.stderr.splitlines()) > 1


def test_converter_input_of_the_wrong_family_is_one_line(tmp_path):
    """A VAR-like state dict given to --family=mar: one line naming the first missing key."""
    sd = tmp_path / "var.npz"
    np.savez(sd, **{"word_embed.weight": np.zeros((8, 4), np.float32), "head.weight": np.zeros((16, 8), np.float32)})
    proc = subprocess.run([sys.executable, "-m", "jaxgen.convert", "--family=mar", "--config=configs/mar_tiny.py",
                           f"--input={sd}", f"--output={tmp_path / 'out'}"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(proc, "--family=mar", "missing")
    assert "fake_latent" in line or "class_emb" in line
    assert not os.path.exists(tmp_path / "out")
