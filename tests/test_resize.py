"""Exactness of the torch-equivalent resizes against hand-derived values (jaxgen.nn.resize)."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.nn.resize import area_matrix, bicubic_matrix, nearest_matrix, resize


def test_bicubic_2_to_4_hand_derived():
    # src = 0.5*(i+0.5)-0.5 = -0.25, 0.25, 0.75, 1.25; cubic kernel a=-0.75, taps clamped to the border:
    # i=0: t=0.75, taps (-2,-1,0,1)->(0,0,0,1): w = cc2(1.75)+cc1(0.75)+cc1(0.25), cc2(1.25)
    #      = -0.03515625+0.26171875+0.87890625, -0.10546875
    # i=1: t=0.25, taps (-1,0,1,2)->(0,0,1,1): w = cc2(1.25)+cc1(0.25), cc1(0.75)+cc2(1.75) = 0.7734375, 0.2265625
    expected = np.array([[1.10546875, -0.10546875],
                         [0.7734375, 0.2265625],
                         [0.2265625, 0.7734375],
                         [-0.10546875, 1.10546875]], np.float32)
    np.testing.assert_array_equal(bicubic_matrix(2, 4), expected)


def test_bicubic_properties():
    for n_in, n_out in [(1, 16), (2, 16), (3, 16), (13, 16), (5, 7), (16, 5)]:
        m = bicubic_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # partition of unity (constants are preserved)
    np.testing.assert_array_equal(bicubic_matrix(1, 4), np.ones((4, 1), np.float32))
    np.testing.assert_array_equal(bicubic_matrix(6, 6), np.eye(6, dtype=np.float32))
    # Overshoot (negative lobes) is what distinguishes torch's a=-0.75 cubic from linear / clamped variants.
    assert bicubic_matrix(3, 16).min() < 0


def test_area_hand_derived():
    # 16 -> 5: windows [floor(16i/5), ceil(16(i+1)/5)) = [0,4), [3,7), [6,10), [9,13), [12,16): overlapping windows of 4.
    m = area_matrix(16, 5)
    for i, (s, e) in enumerate([(0, 4), (3, 7), (6, 10), (9, 13), (12, 16)]):
        row = np.zeros(16, np.float32)
        row[s:e] = 0.25
        np.testing.assert_array_equal(m[i], row)
    np.testing.assert_array_equal(area_matrix(3, 2), np.array([[0.5, 0.5, 0], [0, 0.5, 0.5]], np.float32))
    np.testing.assert_array_equal(area_matrix(4, 2), np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], np.float32))
    np.testing.assert_array_equal(area_matrix(16, 1), np.full((1, 16), 1 / 16, np.float32))


def test_nearest_hand_derived():
    np.testing.assert_array_equal(nearest_matrix(2, 4).argmax(1), [0, 0, 1, 1])
    np.testing.assert_array_equal(nearest_matrix(3, 2).argmax(1), [0, 1])  # floor(1 * 1.5) = 1
    np.testing.assert_array_equal(nearest_matrix(5, 3).argmax(1), [0, 1, 3])  # floor(i * 5/3)


@pytest.mark.parametrize("method", ["bicubic", "area", "nearest"])
def test_resize_nhwc_is_separable_per_channel(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    y = np.asarray(resize(jnp.asarray(x), (7, 2), method))
    assert y.shape == (2, 7, 2, 4)
    mats = {"bicubic": bicubic_matrix, "area": area_matrix, "nearest": nearest_matrix}[method]
    mh, mw = mats(5, 7), mats(3, 2)
    for b in range(2):
        for c in range(4):
            np.testing.assert_allclose(y[b, :, :, c], mh @ x[b, :, :, c] @ mw.T, rtol=1e-6, atol=1e-6)


def test_resize_identity_and_errors():
    x = jnp.ones((1, 4, 4, 2))
    assert resize(x, (4, 4), "bicubic") is x
    with pytest.raises(ValueError):
        resize(x, (2, 2), "bilinear")
