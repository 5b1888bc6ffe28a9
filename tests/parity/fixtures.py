"""Discovery and loading of parity fixtures written in ../shared/parity/README.md's format.

Fixtures are found by CONTENT (the JSON's `official.class` / keys), not by file name, so any fixture
of the same kind (other tiny config, other seed, other name) is picked up. Test ids carry the fixture name.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.normpath(os.path.join(_HERE, "..", "..", "..", "shared", "parity"))


def parity_dir() -> str:
    return os.environ.get("JAXGEN_PARITY_DIR", DEFAULT_DIR)


def kind_of(meta: dict) -> Optional[str]:
    """Classify a fixture JSON into a kind ('mar', 'mar_diffusion', 'mar_diffloss', 'klvae', 'var_vqvae', 'var', ...)."""
    cls = str((meta.get("official") or {}).get("class") or "")
    if "denoiser_kwargs" in meta:
        return "mar_diffloss"
    if cls.startswith("SpacedDiffusion"):
        return "mar_diffusion"
    by_class = {"MAR": "mar", "AutoencoderKL": "klvae", "VQVAE": "var_vqvae", "VAR": "var", "RAR": "rar",
                "UViT": "autonat", "FeatureExtractorInceptionV3": "inception"}
    if cls in by_class:
        return by_class[cls]
    if cls.split(",")[0].strip() == "UViT":  # AutoNAT: "UViT, NATSchedule"
        return "autonat"
    if cls.startswith("PretrainedTokenizer"):
        return "maskgit_vqgan"
    return None


@dataclass
class Fixture:
    name: str
    meta: dict
    directory: str

    def _file(self, key: str) -> Optional[str]:
        """The npz named by meta[key]; the value may carry a note ("mar_weights.npz (keys under ...)").
        A fixture whose JSON has no `io_file` uses `<name>_io.npz`."""
        value = self.meta.get(key)
        names = re.findall(r"[\w.-]+\.npz", str(value)) if value else []
        if not value and key == "io_file":
            names = [f"{self.name}_io.npz"]
        for fname in names:
            path = os.path.join(self.directory, fname)
            if os.path.exists(path):
                return path
        if value:
            raise FileNotFoundError(f"fixture {self.name}: {key} {value!r} not found in {self.directory}")
        return None

    def _load(self, key: str) -> Dict[str, np.ndarray]:
        path = self._file(key)
        if not path:
            return {}
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    @property
    def io(self) -> Dict[str, np.ndarray]:
        if not hasattr(self, "_io"):
            self._io = self._load("io_file")
        return self._io

    @property
    def weights(self) -> Dict[str, np.ndarray]:
        if not hasattr(self, "_weights"):
            self._weights = self._load("weights_file")
        return self._weights


def fixtures_of(kind: str) -> List[Fixture]:
    out = []
    d = parity_dir()
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        try:
            meta = json.load(open(path))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and kind_of(meta) == kind:
            name = meta.get("fixture") or os.path.splitext(os.path.basename(path))[0]
            out.append(Fixture(name=name, meta=meta, directory=d))
    return out


def parametrize_fixtures(kind: str):
    """pytest.mark.parametrize over every fixture of `kind`; ids are the fixture names.

    With no fixture of that kind the test fails loudly (a missing fixture is a setup error, not a pass).
    """
    fx = fixtures_of(kind)
    if not fx:
        return pytest.mark.parametrize("fixture", [pytest.param(None, id=f"no-{kind}-fixture")])
    return pytest.mark.parametrize("fixture", fx, ids=[f.name for f in fx])


def require(fixture):
    if fixture is None:
        pytest.fail(f"no parity fixture found in {parity_dir()} (set JAXGEN_PARITY_DIR)")
    return fixture


def assert_close(name: str, ours, ref, atol: float = 1e-4, rtol: float = 1e-4, rel_to_max: Optional[float] = None):
    """Compare float outputs; reports max|diff| and max|diff|/max|ref| in the failure message."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    diff = np.abs(ours - ref)
    max_diff = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_diff / scale if scale > 0 else max_diff
    if rel_to_max is not None:
        assert rel <= rel_to_max, f"{name}: max|diff|/max|ref| = {rel:.3e} > {rel_to_max:.1e} (max|diff| {max_diff:.3e})"
    else:
        np.testing.assert_allclose(ours, ref, atol=atol, rtol=rtol,
                                   err_msg=f"{name}: max|diff| {max_diff:.3e}, rel-to-max {rel:.3e}")
    return max_diff, rel


def assert_equal_int(name: str, ours, ref):
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    bad = int((ours.astype(np.int64) != ref.astype(np.int64)).sum())
    assert bad == 0, f"{name}: {bad} of {ref.size} integer entries differ"
