"""FID / IS / precision-recall math against closed forms and brute force; reference files; the streamed npz."""
import numpy as np
import pytest

from jaxgen.errors import ConfigError
from jaxgen.eval import metrics as M
from jaxgen.eval import reference as R
from jaxgen.eval.runner import write_npz_streaming


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))  # diagonal covariances
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expect, rel=1e-10)
    a = rng.normal(size=(200, 6))
    mu, sigma = M.feature_stats(a)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False))
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # full covariances: tr((S1 S2)^1/2) = sum of sqrt of the eigenvalues of S1^1/2 S2 S1^1/2
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    mu_b, sigma_b = M.feature_stats(b)
    w, v = np.linalg.eigh(sigma)
    root = (v * np.sqrt(w)) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(root @ sigma_b @ root)).sum()
    expect = np.sum((mu - mu_b) ** 2) + np.trace(sigma) + np.trace(sigma_b) - 2 * tr
    assert M.frechet_distance(mu, sigma, mu_b, sigma_b) == pytest.approx(expect, rel=1e-9)
    assert M.frechet_distance(mu, sigma, mu_b, sigma_b, method="eigh") == pytest.approx(expect, rel=1e-9)
    with pytest.raises(ValueError, match="different sizes"):
        M.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_inception_score_extremes_and_conventions():
    n, k = 400, 4
    confident = 60.0 * np.eye(k)[np.arange(n) % k]  # every sample sure of its class, classes balanced
    mean, std = M.inception_score(confident, convention="adm", split_size=100)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    mean, _ = M.inception_score(confident, splits=10, convention="torch_fidelity")
    assert 3.5 < mean <= k + 1e-6  # shuffled splits of 40 are nearly balanced
    assert M.inception_score(np.zeros((50, 7)), splits=5)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="convention"):
        M.inception_score(confident, convention="tf")


def _brute_pr(ref, samples, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def covered(p, c, r):
        d = ((p[:, None] - c[None]) ** 2).sum(-1)
        return (d <= r[None]).any(1)
    return covered(samples, ref, radii(ref)).mean(), covered(ref, samples, radii(samples)).mean()


def test_precision_recall_matches_brute_force_and_extremes():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(120, 8)).astype(np.float32)
    samples = (rng.normal(size=(90, 8)) * 1.5 + 0.5).astype(np.float32)
    p, r = M.precision_recall(ref, samples, k=3, block=32)
    bp, br = _brute_pr(ref.astype(np.float64), samples.astype(np.float64), 3)
    assert (p, r) == (pytest.approx(bp), pytest.approx(br))
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0
    assert M.precision_recall(ref, ref, k=3) == (1.0, 1.0)
    assert M.precision_recall(ref, ref + 100.0, k=3) == (0.0, 0.0)


def test_running_moments_equal_two_pass_statistics():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(257, 5)) * 3 + 7
    m = R.RunningMoments(5)
    for lo in range(0, 257, 50):
        m.add(x[lo:lo + 50])
    mu, sigma = m.stats()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9)


class _FakeExtractor:
    name = "inception"
    feature_dim = 4
    identity = "fake-v1"

    def __call__(self, images):
        return {"pool": images.reshape(len(images), -1)[:, :4].astype(np.float32)}


def test_reference_files_of_each_kind(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (20, 4, 4, 3), dtype=np.uint8)
    pool = images.reshape(20, -1)[:, :4].astype(np.float32)
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=images, mu=np.ones(4), sigma=np.eye(4))
    ref = R.load(str(adm), _FakeExtractor(), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(ref.pool, pool)  # the reference batch's features, for precision / recall
    np.testing.assert_array_equal(ref.mu, np.ones(4))  # the file's full-train-set statistics win
    assert len(list((tmp_path / "cache").iterdir())) == 1  # featurised once, cached
    only_stats = tmp_path / "fid_stats.npz"
    np.savez(only_stats, mu=np.zeros(4), sigma=np.eye(4))
    assert R.load(str(only_stats), _FakeExtractor()).pool is None
    ours = tmp_path / "digits_ref.npz"
    np.savez(ours, mu=np.zeros(4), sigma=np.eye(4), pool=pool, extractor=np.str_("digits"))
    with pytest.raises(ConfigError, match="holds digits features"):
        R.load(str(ours), _FakeExtractor())
    with pytest.raises(ConfigError, match="does not exist"):
        R.load(str(tmp_path / "missing.npz"), _FakeExtractor())
    wide = tmp_path / "wide.npz"
    np.savez(wide, mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(ConfigError, match="8-d statistics but the inception features are 4-d"):
        R.validate(str(wide), "inception", 4)
    assert R.load(str(adm), _FakeExtractor(), need_pool=False).pool is None  # FID only: arr_0 not featurised


def test_streamed_npz_is_a_normal_npz(tmp_path):
    rng = np.random.default_rng(4)
    parts = [(rng.integers(0, 255, (n, 3, 3, 1), dtype=np.uint8), np.arange(n, dtype=np.int64)) for n in (4, 4, 2)]
    path = str(tmp_path / "samples.npz")
    write_npz_streaming(path, ["arr_0", "arr_1"], 10, [np.uint8, np.int64], lambda: iter(parts))
    with np.load(path) as z:
        np.testing.assert_array_equal(z["arr_0"], np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(z["arr_1"], np.concatenate([p[1] for p in parts]))


def test_eval_config_errors_name_the_key_and_the_fix():
    from configs.mar_b import get_config as mar_b
    from configs.mar_tiny import get_config as mar_tiny
    from jaxgen.eval import runner

    paper = mar_b("")
    assert paper.eval.metric == "inception"
    with pytest.raises(ConfigError, match=r"eval.inception_weights=''.*pt_inception-2015-12-05"):
        runner.check(paper)
    tiny = mar_tiny("")
    runner.check(tiny)
    for key, value, text in (("metric", "kid", "is not one of digits, inception"),
                             ("samples_npz", "png", "is not one of jaxgen, adm, none"),
                             ("shard_size", 0, "must be >= 1")):
        bad = mar_tiny("")
        with bad.unlocked():
            bad.eval[key] = value
        with pytest.raises(ConfigError, match=text):
            runner.check(bad)
    with paper.unlocked():
        paper.eval.metric = "digits"
    with pytest.raises(ConfigError, match="bundled digits"):
        runner.check(paper)


def test_reference_mode_on_digits_equals_the_builtin_reference(tmp_path):
    """--mode=reference's streamed statistics of the digits test split = the digit metric's own (two-pass)."""
    from configs.mar_tiny import get_config
    from jaxgen.eval.features import DigitExtractor

    config = get_config("")
    with config.unlocked():
        config.eval.reference_split = "test"
    extractor = DigitExtractor()
    info = R.compute(config, str(tmp_path / "ref.npz"), extractor, batch_size=128)
    assert info["num_examples"] == 500
    ours = R.load(str(tmp_path / "ref.npz"), extractor)
    builtin = R.digits_reference(extractor)
    np.testing.assert_allclose(ours.mu, builtin.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.sigma, builtin.sigma, rtol=1e-6, atol=1e-7)
    assert ours.pool.shape == builtin.pool.shape
    assert M.frechet_distance(ours.mu, ours.sigma, builtin.mu, builtin.sigma) == pytest.approx(0.0, abs=1e-6)


def test_paper_eval_without_inception_weights_is_one_line_error(tmp_path):
    from tests.cli_utils import run_main

    proc = run_main(["--config=configs/var_d16.py", f"--workdir={tmp_path}", "--mode=eval"])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxgen: error: config.eval.inception_weights=''"), proc.stderr
    assert not (tmp_path / "eval").exists()
