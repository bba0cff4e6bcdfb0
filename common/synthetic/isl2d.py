"""2D in-silico-labeling phantoms: two bright-field planes, phase contrast, DAPI, nucleus and cell labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from common.synthetic.optics import (_WAVELENGTH_UM, _dome, _illumination_2d, _laplacian_2d, _place_non_overlapping,
                                     _relabel_present, camera_noise, ellipse_rho_2d, smooth_noise, star_rho_2d)

__all__ = ["make_isl_2d"]


def make_isl_2d(shape: Sequence[int] = (256, 256), n_cells: int = 20, seed: int = 0, pixel_size_um: float = 0.65,
                bf_defocus_um: float = 2.5, phase_halo_um: float = 3.5, peak_photons: float = 250.0) -> dict:
    """Sparse adherent cells in 2D: two bright-field planes, phase contrast, DAPI, labels.

    Physics: each cell is a dome of cytoplasm (height 1.5-3 um, RI +0.016) with a thicker
    nucleus (4-6 um, RI +0.026) and nucleoli; the optical path difference ``OPD = sum dn * h`` (um)
    gives the phase ``phi = 2 pi OPD / lambda`` (lambda 0.55 um). Bright field at defocus
    ``+-bf_defocus_um`` follows the transport-of-intensity equation
    ``I = I0 (1 - mu OPD - dz lap(OPD))`` blurred by the defocus, so the two planes have opposite
    contrast. Positive phase contrast is ``I0 (1 - gamma (phi - G * phi))``: dark cells with a
    bright halo (``G``: Gaussian of ``phase_halo_um``). DAPI: textured nuclei, per-nucleus
    brightness 0.5-1.5 (mitotic cells: small, bright, condensed), Gaussian PSF, haze, debris,
    Poisson + read noise. About 8% of cells are rounded mitotic cells.

    Args:
        shape: ``YX`` image size (pixels).
        n_cells: number of cells.
        seed: random seed.
        pixel_size_um: pixel size (um), 0.65 um is a 20x objective on a 13 um-pixel camera.
        bf_defocus_um: defocus of the two bright-field planes (below / above focus).
        phase_halo_um: width of the phase-contrast halo.
        peak_photons: expected DAPI photons at nucleus density 1.

    Returns:
        dict with ``"brightfield"`` ``(2, Y, X)`` float32 (relative intensity, planes at
        ``-dz`` and ``+dz``), ``"phase"`` ``(Y, X)`` float32 (relative intensity), ``"dapi"``
        ``(Y, X)`` float32 (photo-electrons incl. a 100 e- offset), ``"nuclei"`` and ``"cells"``
        ``(Y, X)`` int32 instance labels (nucleus ``k`` lies in cell ``k``), ``"opd_um"``
        ``(Y, X)`` float32 optical path difference and ``"spacing_um"`` ``(px, px)``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    px = float(pixel_size_um)
    n = int(n_cells)
    ny, nx = shape

    mitotic = rng.random(n) < 0.08
    r_cell = np.where(mitotic, rng.uniform(6, 8, n), rng.uniform(8, 13, n)) / px  # px
    harm = rng.normal(0, 1, (n, 4)) * np.array([0.15, 0.08, 0.05, 0.03])
    harm[mitotic] *= 0.15
    harm_ph = rng.uniform(0, 2 * np.pi, (n, 4))
    # scale down when the requested cells would crowd the field (keep it sparse-ish)
    crowd = np.sum(np.pi * r_cell ** 2) / (ny * nx)
    if crowd > 0.35:
        r_cell = r_cell * np.sqrt(0.35 / crowd)
    m = 0.3 * float(r_cell.min(initial=0.0))
    centres = _place_non_overlapping(rng, n, r_cell, low=(m, m), high=(ny - m, nx - m), min_factor=0.95)

    cells = np.zeros(shape, np.int32)
    nuclei = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    h_cyto = np.zeros(shape, np.float32)
    h_nuc = np.zeros(shape, np.float32)
    opd_extra = np.zeros(shape, np.float32)
    dna = np.zeros(shape, np.float32)
    texture = smooth_noise(shape, 0.5 / px, rng)
    rough = smooth_noise(shape, 2.0 / px, rng)
    brightness = rng.uniform(0.5, 1.5, n).astype(np.float32)
    for k in range(n):
        res = star_rho_2d(shape, centres[k], r_cell[k], harm[k], harm_ph[k])
        if res is None:
            continue
        sl, rho = res
        rho = rho + 0.05 * rough[sl]
        inside = (rho < 1) & (rho < best[sl])
        cells[sl][inside] = k + 1
        best[sl][inside] = rho[inside]
        hc = (rng.uniform(4, 7) if mitotic[k] else rng.uniform(1.5, 3.0)) * _dome(rho)
        h_cyto[sl] = np.maximum(h_cyto[sl], hc)
        # nucleus: an ellipse inside the cell
        rmin = r_cell[k] * max(0.5, 1 - np.sum(np.abs(harm[k])))
        if mitotic[k]:
            a = min(rng.uniform(2.5, 3.5) / px, 0.6 * rmin)
            b = a * rng.uniform(0.4, 0.7)  # metaphase plate seen from above
        else:
            a = min(rng.uniform(4.0, 6.5) / px, 0.65 * rmin)
            b = a * rng.uniform(0.65, 0.9)
        off = rng.normal(0, 0.5, 2)
        off = off / max(1.0, np.linalg.norm(off)) * max(0.0, rmin - a) * 0.5
        cn = centres[k] + off
        ang = rng.uniform(0, np.pi)
        res_n = ellipse_rho_2d(shape, cn, (a, b), ang)
        if res_n is None:
            continue
        sln, rn = res_n
        rn = rn + 0.03 * rough[sln]
        nin = rn < 1
        nuclei[sln][nin] = k + 1
        cells[sln][nin] = k + 1
        hn = (rng.uniform(6, 8) if mitotic[k] else rng.uniform(4, 6)) * _dome(rn)
        h_nuc[sln] = np.maximum(h_nuc[sln], hn)
        # nucleoli (interphase only)
        nl = np.zeros(rn.shape, bool)
        if not mitotic[k]:
            for _ in range(rng.integers(1, 4)):
                u = rng.normal(size=2)
                u = u / np.linalg.norm(u) * rng.uniform(0, 0.5)
                c_, s_ = np.cos(ang), np.sin(ang)
                pos = cn + np.array([s_ * u[0] * a + c_ * u[1] * b, c_ * u[0] * a - s_ * u[1] * b])
                rr = rng.uniform(0.6, 1.1) / px
                nl |= ellipse_rho_2d(shape, pos, (rr, rr * rng.uniform(0.7, 1)), rng.uniform(0, np.pi), box=sln)[1] < 1
            nl &= nin
        opd_extra[sln] += np.where(nl, 0.015 * 2.0, 0).astype(np.float32)
        tex = 0.2 if mitotic[k] else 0.35
        dens = brightness[k] * (2.5 if mitotic[k] else 1.0) * np.clip(1 + tex * texture[sln], 0, None)
        dens = dens * np.where(nl, 0.3, 1.0)
        dna[sln] = np.where(nin, dens, dna[sln])

    # cytoplasmic granules (vesicles, lipid droplets): small high-OPD spots in the cytoplasm
    gran = (smooth_noise(shape, 0.35 / px, rng) > ndtri(0.95)) & (cells > 0) & (nuclei == 0)
    opd_extra += np.where(gran, 0.012, 0).astype(np.float32)
    dn_c, dn_n = 0.016, 0.026
    thickness = np.maximum(h_cyto, h_nuc)
    opd = dn_c * thickness + (dn_n - dn_c) * h_nuc + opd_extra
    opd = ndi.gaussian_filter(opd, 0.25 / px)  # optical resolution (NA ~0.4-0.75)

    # bright field: two planes at -dz / +dz (TIE + weak scattering loss), defocus blur
    illum = _illumination_2d(shape, rng, 0.06)
    bf = []
    for dz in (-bf_defocus_um, bf_defocus_um):
        blur = np.hypot(0.3, 0.25 * abs(dz)) / px
        o = ndi.gaussian_filter(opd, blur)
        lap = _laplacian_2d(o, 0.3 / px) / px ** 2  # 1/um
        img = illum * (1 - 0.3 * o - 0.2 * dz * lap)  # 0.2: partial-coherence damping
        bf.append(img + rng.normal(0, 0.01, shape).astype(np.float32))
    bf = np.clip(np.stack(bf), 0, None).astype(np.float32)
    # positive phase contrast with halo
    phi = 2 * np.pi * opd / _WAVELENGTH_UM
    hp = phi - ndi.gaussian_filter(phi, phase_halo_um / px, mode="nearest")
    phase = illum * (1 - 0.45 * hp) + rng.normal(0, 0.012, shape).astype(np.float32)
    phase = np.clip(phase, 0, None).astype(np.float32)

    # DAPI
    n_deb = rng.poisson(2)
    for _ in range(n_deb):
        pos = rng.integers(0, shape)
        if nuclei[tuple(pos)] == 0:
            dna[tuple(pos)] += rng.uniform(8, 20)
    blurred = ndi.gaussian_filter(dna, 0.35 / px, mode="nearest")
    haze = ndi.gaussian_filter(blurred, 3.0 / px, mode="nearest")
    bgv = 1 + 0.3 * smooth_noise(shape, 40.0, rng)
    expected = peak_photons * (blurred + 0.15 * haze) + 10.0 * np.clip(bgv, 0.2, None)
    dapi = camera_noise(expected, rng, 3.0, 100.0)

    cells, mapping = _relabel_present(cells)
    lut = np.zeros(n + 1, np.int32)
    for old, new in mapping.items():
        lut[old] = new
    nuclei = lut[nuclei]
    return {
        "brightfield": bf,
        "phase": phase,
        "dapi": dapi.astype(np.float32),
        "nuclei": nuclei,
        "cells": cells,
        "opd_um": opd.astype(np.float32),
        "spacing_um": (px, px),
    }
