"""Optional dense CRF over the [background, cams] scores (method §5, the paper's "+dCRF").

Wraps Krähenbühl's fully-connected CRF through ``pydensecrf2`` (import name ``pydensecrf``;
the original ``pydensecrf`` does not build on Python 3.11). The package is a dependency
of lightning_clipes (the paper's pipeline needs it) but builds from source, so it is imported only
inside the functions and this module imports without it; call :func:`require_crf` when a run is
configured so that a missing package fails at start, not after the first batch.

Conventions of pydensecrf that the parameters below assume (read from its C++ source):

* ``compat`` given as a number is a Potts compatibility of weight w, applied as ``+w·(K Q)(l)``
  on the logits, the textbook ``-w·Σ_{l'≠l}(K Q)(l')`` up to a per-pixel constant.
* Each kernel K is normalised symmetrically, ``D^-1/2 K D^-1/2`` with ``D = K·1``, and
  includes the pixel's own connection (k(i, i) = 1).
* K is filtered with a permutohedral lattice, an approximation of the Gaussian
  ``exp(-|f_i - f_j|²/2)`` on the features ``(x/sxy, y/sxy)`` or ``(x/sxy, y/sxy, rgb/srgb)``.

``dense_crf`` and ``crf_label`` are plain top-level functions of numpy arrays so that they can
run in a ``concurrent.futures.ProcessPoolExecutor``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Same floor as pydensecrf.utils.unary_from_softmax (the helper the reference uses): a score of
# 0 becomes a unary of -log(1e-5) ≈ 11.5 instead of inf.
SCORE_EPS = 1e-5

_MISSING_MESSAGE = (
    "The dense CRF needs the package pydensecrf2 (import name `pydensecrf`), which could not be "
    "imported. Install it with: pip install pydensecrf2 (it builds from source in under a minute and "
    "needs a C++ compiler: conda install -c conda-forge cxx-compiler, or `module load gcc` on a cluster). "
    "The original `pydensecrf` package does not build on Python 3.11. To run without the CRF, set "
    "crf: false (--model.crf false, or --data.labeler.init_args.crf false in fit)."
)


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and kernel parameters; the defaults are CLIP-ES's published ones."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def __post_init__(self) -> None:
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"CRFParams.iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRFParams.{name} must be > 0 (a kernel width), got {getattr(self, name)!r}")


# The evaluation CRF of deeplab-pytorch (kazuto1011/deeplab-pytorch, configs/voc12.yaml, block CRF:
# ITER_MAX 10, POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3), the code CLIP-ES trains and
# evaluates its student with. They are the same numbers as CLIP-ES's pseudo-label CRF (which took them
# from there), written out here so that a change of the labeler's CRF does not change the evaluation.
# deeplab-pytorch feeds its CRF the mean-subtracted BGR image cast to uint8 (it wraps around, as in §5 of
# method.md); we give the real RGB image.
STUDENT_CRF = CRFParams(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0,
                        bilateral_srgb=3.0, bilateral_compat=4.0)


def _import_densecrf():
    try:
        from pydensecrf import densecrf
    except ImportError as err:
        raise ImportError(_MISSING_MESSAGE) from err
    return densecrf


def crf_available() -> bool:
    """Whether ``pydensecrf`` (from the ``pydensecrf2`` package) can be imported."""
    try:
        _import_densecrf()
    except ImportError:
        return False
    return True


def require_crf() -> None:
    """Raise ImportError, naming the pip command, unless the CRF package is installed."""
    _import_densecrf()


def _check_inputs(image: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    scores = np.asarray(scores)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"dense_crf: image must be uint8 RGB in [0, 255], got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"dense_crf: image is empty, shape {image.shape}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2] or scores.shape[0] == 0:
        raise ValueError(
            f"dense_crf: scores must be (C, H, W) with C >= 1 and (H, W) = image's {image.shape[:2]}, "
            f"got shape {scores.shape}"
        )
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"dense_crf: scores must be floating point, got dtype {scores.dtype}")
    if not np.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("dense_crf: scores must be finite and >= 0 (the stacked [background, cams])")
    # pydensecrf wants a C-contiguous, writable uint8 buffer (decoded images can be read-only views)
    return np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]), scores.astype(np.float32, copy=False)


def dense_crf(image: np.ndarray, scores: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals of the dense CRF (method §5).

    Args:
        image: (H, W, 3) uint8, the real RGB image. The reference feeds the BGR image with the
            mean subtracted and cast to uint8, which wraps around (black and white end
            up almost the same colour); we do not copy that bug.
        scores: (C, H, W) float >= 0, the stacked [background, cam_1 … cam_K] scores, not
            renormalised. Unary = -log(max(scores, 1e-5)), so a zero score is a large but finite
            energy.
        params: iterations and kernel parameters.
    Returns:
        Q: (C, H, W) float32, a distribution over the C channels at every pixel.
    """
    densecrf = _import_densecrf()
    image, scores = _check_inputs(image, scores)
    c, h, w = scores.shape
    unary = np.ascontiguousarray(-np.log(np.maximum(scores, SCORE_EPS)).reshape(c, h * w), dtype=np.float32)
    crf = densecrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
    )
    q = np.array(crf.inference(int(params.iterations)), dtype=np.float32)
    return q.reshape(c, h, w)


def crf_label(
    image: np.ndarray, scores: np.ndarray, params: CRFParams = CRFParams()
) -> tuple[np.ndarray, np.ndarray]:
    """Label and confidence after the CRF: argmax of Q and max of Q.

    Args and shapes as :func:`dense_crf`. Returns ((H, W) int64 index into the C score
    channels, 0 = background; (H, W) float32 confidence in [0, 1]).
    """
    q = dense_crf(image, scores, params)
    return q.argmax(axis=0).astype(np.int64), q.max(axis=0).astype(np.float32)
