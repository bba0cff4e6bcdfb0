"""Instance segmentation post-processing shared by the zoo's bundles.

Pure functions, numpy in / numpy out (scikit-image style):

* :func:`otsu_watershed` - classical Otsu + distance-transform watershed, 2D or 3D
  (ground truth from a real/virtual nuclear stain, Spotlight-style evaluation).
* :func:`hmaxima_watershed` - markers from the h-maxima of a (predicted) distance map,
  watershed inside a (predicted) mask (Bonte et al., cell instances from DIC).
* :func:`connected_components` - labelled components with a size filter.
* :func:`cellpose_segment` - optional Cellpose backend with user-supplied weights.

Arrays are ``YX`` or ``ZYX``; ``spacing`` is the voxel size in micrometres in the
same axis order. Returned label images are ``int32``, background 0, objects
numbered 1..n consecutively.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

__all__ = ["otsu_watershed", "remove_border_objects", "hmaxima_watershed", "connected_components", "cellpose_segment"]


def _spacing(spacing, ndim):
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {ndim}D image")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def _size_filter(labels, min_size=0, max_size=None, voxel_volume=1.0):
    """Drop objects with volume < min_size or > max_size, renumber 1..n (int32).

    Own bincount instead of skimage.morphology.remove_small_objects: one pass handles
    both bounds in physical units, and that function's size argument changed
    meaning across scikit-image releases.
    """
    from skimage.segmentation import relabel_sequential

    labels = np.asarray(labels)
    sizes = np.bincount(labels.ravel()) * voxel_volume
    drop = sizes < min_size
    if max_size is not None:
        drop |= sizes > max_size
    drop[0] = False
    if drop.any():
        labels = np.where(drop[labels], 0, labels)
    out, _, _ = relabel_sequential(labels.astype(np.int64, copy=False))
    return out.astype(np.int32)


def _ellipsoid_footprint(radii_vox):
    """Boolean ellipsoid with semi-axes ``radii_vox`` (voxels, >= 0) per axis."""
    r = [max(int(np.floor(x)), 0) for x in radii_vox]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    d = np.zeros([2 * k + 1 for k in r])
    for g, rad in zip(grids, radii_vox):
        if rad > 0:  # an axis with radius < 1 voxel has extent 1 (g == 0 only)
            d = d + (g / rad) ** 2
    return d <= 1.0


def otsu_watershed(
    image,
    spacing=None,
    clahe=True,
    clip_limit=0.01,
    min_size=30.0,
    max_size=None,
    min_distance_um=3.0,
    remove_border=True,
    border_z=False,
    fill_holes=True,
    sigma=1.0,
):
    """Otsu threshold + distance-transform watershed instance segmentation (2D/3D).

    Steps: (1) min-max normalise to [0, 1]; (2) optional CLAHE
    (:func:`skimage.exposure.equalize_adapthist`, works in 3D); (3) Gaussian
    smoothing; (4) Otsu threshold; (5) hole filling; (6) Euclidean distance
    transform with ``sampling=spacing``; (7) seeds = local maxima of the distance
    within an ellipsoidal footprint of radius ``min_distance_um``
    (:func:`skimage.feature.peak_local_max`, per connected component; adjacent
    maxima on a plateau merge into one seed); (8) watershed of ``-distance``
    restricted to the foreground; (9) removal of objects touching the image border
    (:func:`skimage.segmentation.clear_border`); (10) size filter. Deterministic.

    Args:
        image (ndarray, shape (Y, X) or (Z, Y, X)): Fluorescence-like image (bright objects on dark background).
        spacing (float or sequence of float, optional): Voxel size in micrometres (ZYX / YX order). Default: 1 per
            axis, i.e. all physical quantities below are in voxels.
        clahe (bool): Apply contrast-limited adaptive histogram equalisation first.
        clip_limit (float): CLAHE clip limit (0..1).
        min_size, max_size (float, optional): Keep objects with ``min_size <= volume <= max_size`` in um^3 (um^2 in
            2D; voxels when ``spacing`` is None).
        min_distance_um (float): Radius (um) of the footprint in which a seed must be the distance maximum;
            roughly the smallest object radius expected to be split off.
        remove_border (bool): Remove objects touching the image border.
        border_z (bool): In 3D, also remove objects touching the first/last z-plane (default: only
            the lateral Y and X borders, since nuclei are routinely cut by the stack
            ends).
        fill_holes (bool): Fill enclosed holes of the foreground (:func:`scipy.ndimage.binary_fill_holes`).
        sigma (float or sequence of float): Gaussian smoothing standard deviation in voxels (per axis allowed); 0 or
            None disables it.

    Returns:
        labels (ndarray of int32, same shape as ``image``): Instance labels 1..n, background 0. A constant image gives
            all zeros.
    """
    from skimage.exposure import equalize_adapthist
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    img = np.asarray(image, dtype=np.float64)
    if img.ndim not in (2, 3):
        raise ValueError(f"otsu_watershed expects a YX or ZYX image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or inf")
    sp = _spacing(spacing, img.ndim)
    lo, hi = img.min(), img.max()
    if hi == lo:
        return np.zeros(img.shape, dtype=np.int32)
    img = (img - lo) / (hi - lo)
    if clahe:
        img = equalize_adapthist(img, clip_limit=clip_limit)
    if sigma:
        img = ndi.gaussian_filter(img, sigma=sigma)
    if img.max() == img.min():
        return np.zeros(img.shape, dtype=np.int32)
    mask = img > threshold_otsu(img)
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return np.zeros(img.shape, dtype=np.int32)

    distance = ndi.distance_transform_edt(mask, sampling=sp)
    radii = [min_distance_um / s for s in sp]
    footprint = _ellipsoid_footprint(radii)
    components, _ = ndi.label(mask)
    coords = peak_local_max(
        distance,
        footprint=footprint,
        labels=components,
        exclude_border=False,
        min_distance=max(1, int(np.floor(min(radii)))),
    )
    seeds = np.zeros(mask.shape, dtype=bool)
    seeds[tuple(coords.T)] = True
    markers, _ = ndi.label(seeds, structure=np.ones((3,) * img.ndim))
    labels = watershed(-distance, markers, mask=mask)

    if remove_border:
        labels = remove_border_objects(labels, border_z)
    return _size_filter(labels, min_size, max_size, float(np.prod(sp)))


def remove_border_objects(labels, border_z: bool = False) -> np.ndarray:
    """Drop objects touching the lateral (Y, X) image border, and the z ends if ``border_z``.

    :func:`otsu_watershed` applies it to its own output; the Spotlight evaluation applies it to the
    ground truth too, so both are compared on the same population of objects.
    """
    from skimage.segmentation import clear_border

    labels = np.asarray(labels)
    inside = np.ones(labels.shape, bool)
    axes = range(labels.ndim) if (labels.ndim == 2 or border_z) else range(1, labels.ndim)
    for ax in axes:
        idx = [slice(None)] * labels.ndim
        idx[ax] = 0
        inside[tuple(idx)] = False
        idx[ax] = -1
        inside[tuple(idx)] = False
    return clear_border(labels, mask=inside)


def hmaxima_watershed(distance, mask=None, h=0.5, reconstruct=False, connectivity=1):
    """Watershed of a (predicted) distance map seeded by its h-maxima.

    Let ``f`` be ``distance`` inside ``mask`` and ``min(f[mask]) - 2 h`` outside it
    and on a one-voxel frame around the image (so that separate mask components never
    share a marker and each has at least one), and ``HMAX_h(f) = R^delta_f(f - h)`` the reconstruction by dilation of
    ``f - h`` under ``f`` (every peak lowered by ``h``, or to its saddle).

    * ``reconstruct=False`` (default): markers = connected components of
      :func:`skimage.morphology.h_maxima` ``(f, h)``, i.e. of
      ``{f - HMAX_h(f) >= h}``: the *top plateau* of every maximum whose dynamic
      (height above the saddle joining it to a higher maximum) is >= h. The
      watershed floods ``-distance``.
    * ``reconstruct=True``: markers = regional maxima of ``HMAX_h(f)`` (the
      "extended maxima" EMAX_h of Soille 2003 / MATLAB ``imextendedmax``, the
      dual of Naylor et al.'s h-reconstruction post-processing of distance maps):
      for each significant maximum, the whole *cap* ``{f >= peak - h}``
      connected to it. The watershed floods ``-HMAX_h(f)`` (peaks flattened by h).

    The two differ when several points of equal height sit within one cap: two
    equally high peaks separated by a saddle shallower than ``h`` (e.g. two
    touching discs of the same radius) give two markers with plain ``h_maxima``
    (each top has ``f - HMAX = h``), but one merged cap, hence one object, with
    ``reconstruct=True``. Caps are also larger seeds, which makes the result less
    sensitive to noise on the peak.

    Args:
        distance (ndarray, shape (Y, X) or (Z, Y, X)): Distance map (e.g. the network's normalised distance to the
            object edge, values in [0, 1]).
        mask (ndarray of bool, same shape, optional): Foreground (e.g. thresholded predicted mask). Default ``distance
            > 0``.
        h (float): Minimal dynamic, in units of ``distance``, for a maximum to seed an object.
        reconstruct (bool): Use extended maxima of the reconstruction (see above).
        connectivity (int): Neighbourhood (1 .. ndim) for the reconstruction, marker labelling and the
            watershed.

    Returns:
        labels (ndarray of int32, same shape): Instance labels 1..n inside ``mask``, background 0.
    """
    from skimage.measure import label
    from skimage.morphology import h_maxima, local_maxima, reconstruction
    from skimage.segmentation import watershed

    d = np.asarray(distance, dtype=np.float64)
    if d.ndim not in (2, 3):
        raise ValueError(f"hmaxima_watershed expects a YX or ZYX map, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("distance contains NaN or inf")
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")
    mask = d > 0 if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != d.shape:
        raise ValueError(f"mask shape {mask.shape} does not match distance shape {d.shape}")
    if not mask.any():
        return np.zeros(d.shape, dtype=np.int32)
    footprint = ndi.generate_binary_structure(d.ndim, connectivity)
    # background (and a one-voxel frame) at 2 h below the lowest foreground value: every mask
    # component then has a marker, also a flat one and one that touches every border of the image
    low = d[mask].min() - 2 * h
    f = np.pad(np.where(mask, d, low), 1, mode="constant", constant_values=low)
    inner = tuple(slice(1, -1) for _ in range(d.ndim))
    if reconstruct:
        hmax = reconstruction(f - h, f, method="dilation", footprint=footprint)
        peaks = local_maxima(hmax, footprint=footprint, allow_borders=True)[inner] & mask
        relief = -hmax[inner]
    else:
        peaks = h_maxima(f, h, footprint=footprint).astype(bool)[inner] & mask
        relief = -d
    markers = label(peaks, connectivity=connectivity)
    labels = watershed(relief, markers, mask=mask, connectivity=connectivity)
    return labels.astype(np.int32)


def connected_components(binary, connectivity=1, min_size=0):
    """Label connected components of a binary image.

    Args:
        binary (ndarray of bool, shape (Y, X) or (Z, Y, X) (any ndim)):
        connectivity (int): 1 (faces) .. ndim (faces, edges and corners).
        min_size (int): Drop components with fewer voxels.

    Returns:
        labels (ndarray of int32, same shape): Components numbered 1..n in raster order, background 0.
    """
    from skimage.measure import label

    binary = np.asarray(binary).astype(bool)
    labels = label(binary, connectivity=connectivity)
    return _size_filter(labels, min_size)


def cellpose_segment(
    image,
    pretrained_model: str | None,
    diameter: float | None = None,
    channels: Sequence[int] = (0, 0),
    do_3D: bool = False,
    gpu: bool = False,
    **kwargs,
):
    """Segment with Cellpose using weights supplied by the user (optional backend).

    Cellpose is imported lazily. No weights are downloaded: ``pretrained_model``
    must be the path of a Cellpose model file (a built-in name such as
    ``"cyto3"`` would make Cellpose try to download it).

    Args:
        image (ndarray, shape (Y, X), (Y, X, C), (Z, Y, X) or (Z, Y, X, C)): As accepted by
            ``cellpose.models.CellposeModel.eval``.
        pretrained_model (str or Path): Path to the Cellpose weights file.
        diameter (float, optional): Expected object diameter in pixels (default: the model's mean diameter).
        channels (sequence of 2 int): Cellpose 3 channel convention ``[cytoplasm, nucleus]`` (0 = grayscale);
            ignored by Cellpose >= 4.
        do_3D (bool): Run Cellpose in 3D (ZYX input).
        gpu (bool): Use the GPU if available.
        **kwargs: Passed to ``CellposeModel.eval`` (e.g. ``flow_threshold``,
            ``cellprob_threshold``, ``anisotropy``, ``z_axis``).

    Returns:
        labels (ndarray of int32): Instance masks, background 0.

    Raises:
        ValueError: ``pretrained_model`` missing or not an existing file.
        ImportError: Cellpose is not installed.
    """
    if not pretrained_model:
        raise ValueError(
            "cellpose_segment needs pretrained_model=<path to your Cellpose weights file>; "
            "weights cannot be downloaded here (no internet). Train one with cellpose or copy it in."
        )
    path = Path(pretrained_model)
    if not path.is_file():
        raise ValueError(
            f"Cellpose weights not found at '{pretrained_model}': pass the path to an existing weights "
            "file (built-in model names would need a download, which is not possible here)."
        )
    try:
        import cellpose
        from cellpose import models
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("cellpose_segment needs the optional package 'cellpose' (pip install 'cellpose<4')") from err
    version = getattr(cellpose, "version", None) or "3"
    model = models.CellposeModel(gpu=gpu, pretrained_model=str(path))
    eval_kwargs = dict(diameter=diameter, do_3D=do_3D, **kwargs)
    if int(str(version).split(".")[0]) < 4:
        eval_kwargs["channels"] = list(channels)
    masks = model.eval(np.asarray(image), **eval_kwargs)[0]
    return np.asarray(masks).astype(np.int32)
