"""2D DIC phantoms: densely packed touching cells in Nomarski DIC with a membrane stain and cell labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from common.synthetic.optics import (_WAVELENGTH_UM, _dome, _illumination_2d, _laplacian_2d, _place_non_overlapping,
                                     _relabel_present, camera_noise, ellipse_rho_2d, smooth_noise)

__all__ = ["make_dic_membrane_2d"]


def _keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 4-connected piece of every label (fragments become 0)."""
    out = labels.copy()
    objs = ndi.find_objects(labels)
    for k, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        m = labels[sl] == k
        cc, ncc = ndi.label(m)
        if ncc > 1:
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            out[sl][m & (cc != np.argmax(sizes))] = 0
    return out


def make_dic_membrane_2d(shape: Sequence[int] = (256, 256), n_cells: int = 15, n_planes: int = 1, seed: int = 0,
                         pixel_size_um: float = 0.33, shear_um: float = 0.3, shear_angle_deg: float = 45.0,
                         plane_spacing_um: float = 1.0, bias_retardation: float = np.pi / 3,
                         peak_photons: float = 200.0) -> dict:
    """Densely packed, touching cells seen in Nomarski DIC, with a membrane stain and cell labels.

    Geometry: seeds are placed with a minimum distance inside one to three colony discs; cells
    are the additively weighted Voronoi regions of the seeds (variable sizes, curved borders,
    smoothly warped), cut by the colony outline, so neighbours share borders.

    Physics: cell thickness rises from the cell border to a plateau (2-4 um, RI +0.016), the
    nucleus adds a dome (RI +0.026), nucleoli and granules add small bumps; ``phi = 2 pi OPD /
    lambda``. DIC interferes two copies of the wave sheared by ``shear_um`` along
    ``shear_angle_deg`` with a bias retardation ``beta`` (``bias_retardation``):
    ``I = I0 sin^2((beta + phi(r + s/2) - phi(r - s/2)) / 2)``
    ~ ``I0 sin^2(beta / 2) + I0 sin(beta) / 2 * s * d(phi)/ds``, a directional derivative around
    the bias ``I0 sin^2(beta / 2)`` (relief shading; a smaller ``beta`` gives more contrast). Plane ``p`` is defocused
    by ``(p - (n_planes - 1) / 2) * plane_spacing_um``: extra blur plus a transport-of-intensity
    term. The membrane stain (CellMask-like) is bright on both sides of every cell border with
    a brightness varying along it, plus weak cytoplasm and a few endocytic puncta, Gaussian
    PSF, haze and Poisson + read noise.

    Args:
        shape: ``YX`` size (pixels).
        n_cells: number of cells (seeds).
        n_planes: number of DIC focal planes.
        seed: random seed.
        pixel_size_um: pixel size (um), 0.33 um ~ a 40x objective.
        shear_um: DIC shear distance (um).
        shear_angle_deg: shear direction, degrees from the x axis towards y.
        plane_spacing_um: defocus step between DIC planes.
        bias_retardation: DIC bias ``beta`` (radians), set with the compensator / prism offset.
        peak_photons: expected membrane photons at density 1.

    Returns:
        dict with ``"dic"`` ``(n_planes, Y, X)`` float32 (relative intensity around the
        bias ``"dic_bias"`` = ``sin^2(beta / 2)`` times the illumination ~1), ``"membrane"`` ``(Y, X)`` float32
        (photo-electrons incl. a 100 e- offset), ``"cells"`` ``(Y, X)`` int32 labels,
        ``"opd_um"`` and ``"spacing_um"``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    ny, nx = shape
    px = float(pixel_size_um)
    n = int(n_cells)

    # colony discs covering ~n_cells cells of ~55% field / 15 cells
    cell_area = min(0.6 * ny * nx / max(n, 1), (22.0 / px) ** 2)  # px^2
    d_min = 0.85 * np.sqrt(cell_area)
    n_col = int(rng.integers(1, 4))
    share = rng.dirichlet(np.ones(n_col) * 3)
    col_r = np.sqrt(share * n * cell_area / np.pi) * 1.05
    col_c = np.stack([rng.uniform(0.2 * ny, 0.8 * ny, n_col), rng.uniform(0.2 * nx, 0.8 * nx, n_col)], 1)

    def in_colony(c, r):
        return bool(np.any(np.linalg.norm(col_c - c, axis=1) < col_r))

    seeds = _place_non_overlapping(rng, n, np.full(n, d_min / 2), low=(0, 0), high=(ny, nx), min_factor=1.0,
                                   inside=in_colony, tries=300)
    weights = rng.normal(0, 0.12 * d_min, n)
    # warped coordinates -> wiggly borders
    warp = 0.06 * d_min
    yy = np.arange(ny, dtype=np.float32)[:, None] + warp * smooth_noise(shape, 0.25 * d_min, rng)
    xx = np.arange(nx, dtype=np.float32)[None, :] + warp * smooth_noise(shape, 0.25 * d_min, rng)
    dist = np.full((max(n, 1),) + shape, np.inf, np.float32)
    for k in range(n):
        dist[k] = np.hypot(yy - seeds[k, 0], xx - seeds[k, 1]) - weights[k]
    owner = np.argmin(dist, 0)
    dmin = np.take_along_axis(dist, owner[None], 0)[0]
    cluster = dmin < 0.62 * d_min + 0.1 * d_min * smooth_noise(shape, 0.3 * d_min, rng)
    cells = np.where(cluster & (n > 0), owner + 1, 0).astype(np.int32)
    cells = _keep_largest_component(cells)
    cells, _ = _relabel_present(cells)
    nlab = int(cells.max())

    # thickness: rises from each cell's border to a plateau
    from skimage.segmentation import find_boundaries

    border = find_boundaries(cells, mode="inner", connectivity=1) & (cells > 0)
    edt = ndi.distance_transform_edt(~border & (cells > 0)).astype(np.float32)
    thick = np.zeros(shape, np.float32)
    nuc_h = np.zeros(shape, np.float32)
    extra = np.zeros(shape, np.float32)
    objs = ndi.find_objects(cells)
    mem_bright = np.zeros(nlab + 1, np.float32)
    for k, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        m = cells[sl] == k
        e = edt[sl] * m
        emax = max(float(e.max()), 1.0)
        h = rng.uniform(2.0, 4.0)
        thick[sl] += np.where(m, h * (1 - (1 - np.clip(e / emax, 0, 1)) ** 2), 0).astype(np.float32)
        mem_bright[k] = rng.uniform(0.6, 1.4)
        # nucleus around the innermost point
        iy, ix = np.unravel_index(np.argmax(e), e.shape)
        cn = (sl[0].start + iy, sl[1].start + ix)
        a = 0.75 * emax * rng.uniform(0.7, 0.95)
        b = a * rng.uniform(0.7, 0.95)
        res = ellipse_rho_2d(shape, cn, (a, b), rng.uniform(0, np.pi))
        if res is None:
            continue
        sln, rn = res
        nin = (rn < 1) & (cells[sln] == k)
        nuc_h[sln] = np.maximum(nuc_h[sln], np.where(nin, rng.uniform(2.0, 3.0) * _dome(rn), 0))
        for _ in range(rng.integers(1, 4)):
            off = rng.normal(0, 0.25, 2) * np.array([a, b])
            rr = rng.uniform(0.5, 0.9) / px
            rho_nl = ellipse_rho_2d(shape, np.asarray(cn) + off, (rr, rr), 0.0, box=sln)[1]
            extra[sln] += np.where((rho_nl < 1) & nin, 0.03, 0).astype(np.float32)
    gran = (smooth_noise(shape, 0.3 / px, rng) > ndtri(0.96)) & (cells > 0) & (nuc_h == 0)
    extra += np.where(gran, 0.015, 0).astype(np.float32)
    opd = 0.016 * thick + 0.010 * nuc_h + extra
    opd = ndi.gaussian_filter(opd, 0.2 / px)  # optical resolution (NA ~1.3 oil)

    phi = (2 * np.pi / _WAVELENGTH_UM) * opd
    th = np.deg2rad(shear_angle_deg)
    illum = _illumination_2d(shape, rng, 0.05)
    dic = []
    for p in range(int(n_planes)):
        dz = (p - (n_planes - 1) / 2) * plane_spacing_um
        blur = np.hypot(0.15, 0.3 * abs(dz)) / px
        ph = ndi.gaussian_filter(phi, blur, mode="nearest")
        gy = ndi.gaussian_filter(ph, blur + 0.5, order=(1, 0), mode="nearest") / px
        gx = ndi.gaussian_filter(ph, blur + 0.5, order=(0, 1), mode="nearest") / px
        dphi = shear_um * (np.cos(th) * gx + np.sin(th) * gy)
        lap = _laplacian_2d(opd, blur + 0.5) / px ** 2
        img = illum * np.sin((bias_retardation + dphi) / 2) ** 2 * (1 - 0.2 * dz * lap)
        dic.append(img + rng.normal(0, 0.004, shape).astype(np.float32))
    dic = np.stack(dic).astype(np.float32)

    # membrane stain
    mem = np.zeros(shape, np.float32)
    along = np.clip(1 + 0.35 * smooth_noise(shape, 1.5 / px, rng), 0.2, None)
    mem[border] = (mem_bright[cells] * along)[border]
    cyto = (cells > 0) & ~border
    mem += np.where(cyto, 0.08 * np.clip(1 + 0.5 * smooth_noise(shape, 0.5 / px, rng), 0, None), 0).astype(np.float32)
    puncta = (smooth_noise(shape, 0.25 / px, rng) > ndtri(0.993)) & cyto
    mem += np.where(puncta, 0.8, 0).astype(np.float32)
    blurred = ndi.gaussian_filter(mem, 0.2 / px, mode="nearest")
    haze = ndi.gaussian_filter(blurred, 2.0 / px, mode="nearest")
    expected = peak_photons * (blurred + 0.2 * haze) + 8.0
    membrane = camera_noise(expected, rng, 3.0, 100.0)
    return {
        "dic": dic,
        "membrane": membrane.astype(np.float32),
        "cells": cells,
        "opd_um": opd.astype(np.float32),
        "dic_bias": float(np.sin(bias_retardation / 2) ** 2),
        "spacing_um": (px, px),
    }
