"""Image similarity for virtual staining: Pearson r, PSNR, SSIM, MicroMS3IM, range rescaling, background variability."""

from __future__ import annotations

import numpy as np

from common.metrics.base import DegenerateInputError, _as_mask, _images_2d3d, _pair

__all__ = ["pearson_r", "psnr", "ssim", "rescale_to_range", "microssim_3d", "background_variability"]


def pearson_r(pred, target, mask=None):
    """Pearson correlation coefficient between two images.

    Args:
        pred, target (ndarray, shape (...)): Images of identical shape (any dimensionality).
        mask (ndarray of bool, same shape, optional): Only voxels where ``mask`` is True are used (e.g. the
            foreground).

    Returns:
        r (float): Pearson's r in [-1, 1]. If either input is constant over the evaluated
            voxels, r is defined as 0.0 (not NaN): a constant prediction carries no
            linear information about the target.

    Raises:
        DegenerateInputError: Empty mask.
        ValueError: Shape mismatch.
    """
    x, y = _pair(pred, target, mask)
    x = x.ravel()
    y = y.ravel()
    # exact test: the mean of a constant float array is not always bit-equal to it
    if x.size < 2 or x.max() == x.min() or y.max() == y.min():
        return 0.0
    dx = x - x.mean()
    dy = y - y.mean()
    den = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    if den == 0:
        return 0.0
    return float(np.clip(np.dot(dx, dy) / den, -1.0, 1.0))


def psnr(pred, target, data_range=None, mask=None):
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / MSE)`` in dB.

    Args:
        pred, target (ndarray, shape (...)): Prediction and reference of identical shape.
        data_range (float, optional): Dynamic range of the reference. Default: ``target.max() - target.min()``
            over the whole image, also when a mask is given (so that whole-image and
            foreground PSNR share one peak value). The Spotlight paper first maps the
            prediction onto the target range, see :func:`rescale_to_range`.
        mask (ndarray of bool, same shape, optional): MSE over the masked voxels only, i.e. ``psnr(p, t, mask=m) ==
            skimage psnr(t[m], p[m], data_range=ptp(t))``.

    Returns:
        float: PSNR in dB; ``inf`` when the images are identical.

    Raises:
        DegenerateInputError: Empty mask, or a zero data range (constant target and no explicit
            ``data_range``).
        ValueError: Shape mismatch.
    """
    if data_range is None:
        t = np.asarray(target)
        data_range = float(t.max()) - float(t.min()) if t.size else 0.0
    x, y = _pair(pred, target, mask)
    if not data_range > 0:
        raise DegenerateInputError(f"data_range is {data_range} (constant target): PSNR is undefined; pass "
                                   "data_range explicitly (e.g. the range of the training targets)")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(pred, target, data_range=None, mask=None, win_size=None, gaussian_weights=False, **kwargs):
    """Structural similarity (Wang et al. 2004) for 2D or 3D images.

    Wraps :func:`skimage.metrics.structural_similarity` with ``full=True`` and
    averages the local SSIM map.

    Args:
        pred, target (ndarray, shape (Y, X) or (Z, Y, X)): Prediction and reference (single channel). Every axis must
            be at least ``win_size`` long.
        data_range (float, optional): Default: ``target.max() - target.min()`` over the whole image (the SSIM
            constants C1, C2 are global, so the mask does not change them).
        mask (ndarray of bool, same shape, optional): Average the SSIM map over ``mask`` instead of the whole image.
        win_size (int, optional): Side of the sliding window (odd). Default as scikit-image: 7, or
            ``2 int(3.5 sigma + 0.5) + 1`` (11 for sigma 1.5) with ``gaussian_weights``.
        gaussian_weights (bool): Gaussian-weighted window (sigma 1.5), as Wang et al.
        **kwargs: Passed to :func:`skimage.metrics.structural_similarity` (e.g. ``K1``, ``K2``).

    Returns:
        float: Mean SSIM. As in scikit-image, the map is averaged only over voxels at least
            ``(win_size - 1) // 2`` from every border (where the window fits); with a
            mask, over the mask intersected with that interior. Hence a mask of all True
            reproduces scikit-image's value exactly.

    Raises:
        DegenerateInputError: Constant target without ``data_range``, an axis shorter than ``win_size``, or
            a mask with no voxel inside the interior.
        ValueError: Shape mismatch, ndim not 2 or 3.
    """
    from skimage.metrics import structural_similarity

    pred, target = _images_2d3d(pred, target, what="ssim")
    if data_range is None:
        data_range = float(target.max() - target.min())
    if not data_range > 0:
        raise DegenerateInputError(f"data_range is {data_range} (constant target): SSIM is undefined; pass "
                                   "data_range explicitly (e.g. the range of the training targets)")
    if win_size is None:  # scikit-image's rule, needed here to know its border crop
        win_size = 2 * int(3.5 * kwargs.get("sigma", 1.5) + 0.5) + 1 if gaussian_weights else 7
    if min(pred.shape) < win_size:
        raise DegenerateInputError(
            f"every axis must be >= win_size={win_size}, got shape {pred.shape}; pass a smaller odd win_size"
        )
    mssim, smap = structural_similarity(
        target,
        pred,
        data_range=data_range,
        win_size=win_size,
        gaussian_weights=gaussian_weights,
        full=True,
        **kwargs,
    )
    if mask is None:
        return float(mssim)
    mask = _as_mask(mask, target.shape)
    pad = (win_size - 1) // 2
    inner = np.zeros_like(mask)
    inner[tuple(slice(pad, s - pad) for s in mask.shape)] = True
    sel = mask & inner
    if not sel.any():
        raise DegenerateInputError(f"mask has no voxel at least {pad} (= (win_size-1)//2) voxels from the border; "
                                   "pass a smaller odd win_size or a larger mask")
    return float(smap[sel].mean(dtype=np.float64))


def rescale_to_range(pred, lo, hi):
    """Min-max rescale ``pred`` linearly onto ``[lo, hi]``.

    Used before PSNR as in the Spotlight paper: the prediction is mapped onto the
    target's range (``lo=target.min(), hi=target.max()``).

    Args:
        pred (ndarray, shape (...)):
        lo, hi (float): Output range.

    Returns:
        ndarray, float64, same shape: ``lo + (pred - pred.min()) * (hi - lo) / (pred.max() - pred.min())``. A
            constant ``pred`` maps to ``lo`` everywhere.
    """
    pred = np.asarray(pred, dtype=np.float64)
    pmin, pmax = pred.min(), pred.max()
    if pmax == pmin:
        return np.full(pred.shape, float(lo))
    return lo + (pred - pmin) * ((hi - lo) / (pmax - pmin))


def _ms_ssim_min_size(ms_ssim_kwargs) -> int:
    """Smallest slice side (px) that torchmetrics' MS-SSIM accepts with these settings.

    Its rules: side >= 2**n and side // max(1, n - 1)**2 > kernel_size - 1 (n = len(betas)), and the
    reflect padding of the Gaussian window (half-width ``int(3.5 sigma + 0.5)``, or ``(kernel_size - 1) // 2``
    without ``gaussian_kernel``) must be smaller than the side at the coarsest scale, side // 2**(n-1);
    MicroSSIM's fit needs 7 px (a 7-px SSIM window).
    """
    betas = ms_ssim_kwargs.get("betas", (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    n = len(betas)
    k = ms_ssim_kwargs.get("kernel_size", 11)
    k = max(k) if isinstance(k, (tuple, list)) else int(k)
    sigma = ms_ssim_kwargs.get("sigma", 1.5)
    sigma = max(sigma) if isinstance(sigma, (tuple, list)) else float(sigma)
    pad = int(3.5 * sigma + 0.5) if ms_ssim_kwargs.get("gaussian_kernel", True) else (k - 1) // 2
    return max(2 ** n, k * max(1, n - 1) ** 2, (pad + 1) * 2 ** (n - 1), 7)


def microssim_3d(pred, target, bg_percentile=3, **ms_ssim_kwargs):
    """MicroMS3IM (Ashesh et al. 2024, PyPI ``microssim``) of a 3D stack.

    ``microssim.MicroMS3IM`` is 2D only; as the package itself does for arrays with
    more than two dimensions, the background offsets, normalisation maximum and
    range-invariance factor are fitted on the whole stack, and the score is the mean
    of the per-z-slice MicroMS3IM.

    Args:
        pred, target (ndarray, shape (Z, Y, X)):
        bg_percentile (int): Percentile taken as background offset (package default 3).
        **ms_ssim_kwargs: Passed to ``torchmetrics`` ``MultiScaleStructuralSimilarityIndexMeasure``
            (e.g. ``betas=(0.5, 0.5)`` and ``kernel_size=7`` for slices smaller than
            176 px, which the default 5 scales with an 11-px kernel need).

    Returns:
        float: Mean MicroMS3IM over the z slices where the target is not constant. A slice
            where the target is constant has no MS-SSIM (the package takes the slice's
            range as data range, 0 there, and gives an arbitrary 0 or NaN) and is left out,
            so blank or padded slices at the ends of a stack do not change the score.

    Raises:
        ImportError: The ``microssim`` package is not installed.
        DegenerateInputError: The target is constant over the whole stack or in every slice, or a slice is
            smaller than the MS-SSIM settings allow (the message gives the minimum and
            settings that fit).
        ValueError: Not 3D, or shape mismatch.
    """
    try:
        from microssim import MicroMS3IM
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "microssim_3d needs the optional package 'microssim' (pip install microssim); "
            f"import failed: {err}"
        ) from err
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"microssim_3d expects two ZYX stacks of equal shape, got {pred.shape} and {target.shape}")
    need = _ms_ssim_min_size(ms_ssim_kwargs)
    if min(target.shape[1:]) < need:
        raise DegenerateInputError(
            f"microssim_3d: slices of {target.shape[1]}x{target.shape[2]} px are smaller than the {need} px that "
            f"MS-SSIM needs with {ms_ssim_kwargs or 'its default 5 scales and 11-px kernel'}; pass "
            "betas=(0.5, 0.5), kernel_size=7 (slices >= 12 px), or skip MicroMS3IM for such small images")
    if target.max() == target.min():
        raise DegenerateInputError(f"microssim_3d: the target is constant (every value {target.flat[0]:g}): "
                                   "MicroMS3IM is undefined; evaluate on a target with structure")
    keep = [z for z in range(target.shape[0]) if target[z].max() > target[z].min()]
    metric = MicroMS3IM(bg_percentile=bg_percentile)
    try:
        metric.fit(target, pred)
        scores = [float(metric.score(target[z], pred[z], **ms_ssim_kwargs)) for z in keep]
    except (ValueError, RuntimeError) as err:  # the packages' own size checks, in case ours missed a rule
        raise DegenerateInputError(f"microssim_3d: stacks of shape {target.shape} with MS-SSIM settings "
                                   f"{ms_ssim_kwargs}: {err}; pass betas=(0.5, 0.5), kernel_size=7 or skip "
                                   "MicroMS3IM") from err
    bad = [z for z, v in zip(keep, scores) if not np.isfinite(v)]
    if bad:
        raise DegenerateInputError(f"microssim_3d: MS-SSIM is not finite in z slice(s) {bad} (normalised target "
                                   "range 0 after the background offset?); check those slices of the target")
    return float(np.mean(scores))


def background_variability(pred, mask):
    """Standard deviation of ``pred`` outside the foreground ``mask``.

    Quantifies background noise/haze of a virtual stain (Spotlight's claim that the
    foreground-aware loss suppresses background).

    Args:
        pred (ndarray, shape (...)):
        mask (ndarray of bool, same shape): Foreground; the statistic is computed where ``mask`` is False.

    Returns:
        float: Population std (ddof=0) of the background voxels, in the units of ``pred``.

            An empty mask (no foreground) gives the std of the whole image.

    Raises:
        DegenerateInputError: No background voxel (the mask covers the whole image).
        ValueError: Shape mismatch.
    """
    pred = np.asarray(pred, dtype=np.float64)
    mask = _as_mask(mask, pred.shape)
    bg = pred[~mask]
    if bg.size == 0:
        raise DegenerateInputError("mask covers the whole image: no background to evaluate; background "
                                   "variability needs a foreground mask that leaves some background")
    return float(bg.std())
