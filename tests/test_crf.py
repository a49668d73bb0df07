"""Dense CRF (method §5) against a literal mean-field loop and hand-made images."""
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from lightning_clipes.components.crf import CRFParams, crf_available, crf_label, dense_crf, require_crf


@pytest.fixture
def densecrf():
    return pytest.importorskip("pydensecrf.densecrf")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def literal_mean_field(image, scores, p: CRFParams, textbook: bool = False) -> np.ndarray:
    """Dense-CRF mean field with explicit N x N Gaussian kernels, in float64.

    pydensecrf's conventions (read from its C++ source): each kernel includes the self
    connection k(i, i) = 1 and is normalised symmetrically, D^-1/2 K D^-1/2 with D = K·1; a
    number ``compat`` is Potts of weight w, applied as +w·(K Q)(l), which equals the textbook
    -w·Σ_{l'≠l}(K Q)(l') up to a per-pixel constant that the softmax drops.
    ``textbook=True``: no self connection, no normalisation, the Σ_{l'≠l} form.
    """
    c, h, w = scores.shape
    yy, xx = np.mgrid[:h, :w]
    pos = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64)
    rgb = image.reshape(-1, 3).astype(np.float64)
    d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    d_rgb = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
    kernels = [
        (np.exp(-d_pos / (2 * p.gaussian_sxy**2)), p.gaussian_compat),
        (np.exp(-d_pos / (2 * p.bilateral_sxy**2) - d_rgb / (2 * p.bilateral_srgb**2)), p.bilateral_compat),
    ]
    unary = -np.log(np.maximum(scores, 1e-5)).reshape(c, -1).astype(np.float64)
    q = _softmax(-unary)
    for _ in range(p.iterations):
        logits = -unary
        for k, weight in kernels:
            if textbook:
                kq = q @ (k - np.eye(len(k))).T  # (C, N): Σ_{j≠i} k(i, j) Q_j(l)
                logits = logits - weight * (kq.sum(0, keepdims=True) - kq)
            else:
                d = k.sum(1)
                kq = q @ (k / np.sqrt(d[:, None] * d[None])).T
                logits = logits + weight * kq
        q = _softmax(logits)
    return q.reshape(c, h, w)


def _random_case(seed: int, h: int = 12, w: int = 12, c: int = 3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.random((c, h, w), dtype=np.float32)


def test_q_is_a_distribution_per_pixel(densecrf):
    image, scores = _random_case(0, h=16, w=20, c=4)
    q = dense_crf(image, scores)
    assert q.shape == (4, 16, 20) and q.dtype == np.float32
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    label, confidence = crf_label(image, scores)
    assert label.shape == (16, 20) and label.dtype == np.int64
    assert confidence.dtype == np.float32
    np.testing.assert_array_equal(label, q.argmax(0))
    np.testing.assert_array_equal(confidence, q.max(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_literal_mean_field(densecrf, seed):
    # Random colours make the bilateral kernel mostly the self connection, the case where the
    # conventions (self term, normalisation) change the answer. The lattice only approximates
    # the Gaussian filter (measured on the sxy = 1 kernel: 0.094 for 0.097 at one pixel), so we
    # compare labels (>= 95 %) and Q loosely (mean |diff| < 0.05), not to float precision.
    image, scores = _random_case(seed)
    p = CRFParams()
    q = dense_crf(image, scores, p)
    expected = literal_mean_field(image, scores, p)
    assert (q.argmax(0) == expected.argmax(0)).mean() >= 0.95
    assert np.abs(q - expected).mean() < 0.05
    # The comparison can tell the conventions apart: the textbook form lands far away.
    textbook = literal_mean_field(image, scores, p, textbook=True)
    assert np.abs(q - textbook).mean() > 0.1


def _two_regions(seed: int):
    """24x32 image: blue left of column 13, yellow from it; scores favour the right label on ~70 %."""
    rng = np.random.default_rng(seed)
    h, w = 24, 32
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, 13:] = 1
    image = np.where(truth[..., None] == 0, np.uint8([40, 90, 200]), np.uint8([220, 180, 30])).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < 0.3, 1 - truth, truth)
    scores = rng.uniform(0.3, 0.5, (2, h, w)).astype(np.float32)
    rows, cols = np.mgrid[:h, :w]
    scores[noisy, rows, cols] += 0.2
    return image, scores, truth


@pytest.mark.parametrize("seed", [0, 1])
def test_bilateral_term_snaps_labels_to_colour_regions(densecrf, seed):
    image, scores, truth = _two_regions(seed)
    assert (scores.argmax(0) == truth).mean() < 0.8
    label, confidence = crf_label(image, scores)
    np.testing.assert_array_equal(label, truth)
    assert confidence.min() > 0.9
    # Without the colour edge the same scores do not give the regions: it is the image that does it.
    grey, _ = crf_label(np.full_like(image, 128), scores)
    assert (grey == truth).mean() < 0.9


def test_zero_and_tiny_scores_stay_finite(densecrf):
    image, scores = _random_case(3, h=16, w=16)
    scores[:, :4] = 0.0
    scores[1, 4:8] = 1e-30
    scores[:, 8:] = np.where(scores[:, 8:] > 0.5, 0.0, scores[:, 8:])
    for s in (scores, np.zeros_like(scores)):
        q = dense_crf(image, s)
        assert np.isfinite(q).all()
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    # All-zero scores are all equally unlikely: Q stays uniform.
    np.testing.assert_allclose(dense_crf(image, np.zeros_like(scores)), 1 / 3, atol=1e-5)


def test_bad_inputs_say_what_was_expected(densecrf):
    image, scores = _random_case(0)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), scores)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dense_crf(image, scores[:, :-1])
    with pytest.raises(ValueError, match=">= 0"):
        dense_crf(image, scores - 1)
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(iterations=-1)


def test_require_crf_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert not crf_available()
    with pytest.raises(ImportError, match="pip install") as err:
        require_crf()
    assert "pydensecrf2" in str(err.value)
    with pytest.raises(ImportError, match="pip install"):
        dense_crf(*_random_case(0))


def test_crf_label_in_a_worker_process(densecrf):
    image, scores, _ = _two_regions(0)
    params = CRFParams(iterations=5)
    # spawn: the worker imports the module afresh, as a worker of a real job would.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        label, confidence = pool.submit(crf_label, image, scores, params).result(timeout=120)
    expected_label, expected_confidence = crf_label(image, scores, params)
    np.testing.assert_array_equal(label, expected_label)
    np.testing.assert_array_equal(confidence, expected_confidence)
