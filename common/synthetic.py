"""Deterministic, physically plausible microscopy phantoms with ground truth.

Every generator takes an explicit ``seed`` (``np.random.default_rng(seed)``): the same
arguments give bit-identical arrays. Images are ``float32``, label images ``int32`` in memory
(written as ``uint16`` OME-TIFF by the ``write_*`` helpers). Axis order follows the project:
``ZYX`` / ``CZYX`` for 3D, ``YX`` / ``CYX`` for 2D. Lengths are in micrometres (um), voxel sizes
``spacing_um`` in ``ZYX`` (or ``YX``) order; voxel ``i`` sits at ``i * spacing`` um.

Generators
----------
:func:`make_cell_field_3d`
    Adherent cells in a 3D field. A refractive-index (RI) map (medium < cytoplasm < nucleus <
    nucleolus, cytoplasmic granules) gives the transmitted-light (bright-field) stack: a weak
    absorption/scattering term (objects slightly dark) plus the defocus (transport-of-intensity)
    term ``-int (z - z') lap_xy dn(z') dz'`` limited by partial coherence, which is odd in
    defocus, so an object is bright on one side of focus and dark on the other and invisible
    in its own focal plane. The DNA (Hoechst) target has textured nuclei with dark nucleoli,
    per-nucleus brightness, an anisotropic Gaussian PSF, out-of-focus haze, debris, Poisson shot
    and Gaussian read noise and a camera offset.
:func:`make_isl_2d`
    Sparse 2D cells (optical path-length map) seen as two defocused bright-field planes
    (contrast of opposite sign), Zernike phase contrast (dark cells with a bright halo) and a
    DAPI stain, with nucleus and cell instance labels (nucleus ``k`` lies in cell ``k``).
:func:`make_dic_membrane_2d`
    Densely packed touching cells (a weighted Voronoi tessellation of seeds inside colony
    masks) seen in Nomarski DIC (bias-retarded interference of two sheared copies of the phase,
    i.e. a 45 degree directional derivative around a bias) and a CellMask-like membrane stain.
:func:`make_fucci_spheroid`
    A dense spheroid of nuclei at 5 um z-steps with FUCCI reporters (Cy3 / mKO2-hCdt1 in G1,
    GFP / mAG-hGeminin in S/G2/M, both at G1/S, neither in early G1) plus Hoechst, dimming
    with depth and towards the spheroid centre (scattering).

``write_dataset_3d``, ``write_dataset_2d_isl``, ``write_dataset_2d_dic`` and
``write_fucci_dataset`` write OME-TIFF files with voxel sizes and CSV manifests whose paths
are relative to the CSV's folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

__all__ = [
    "PHASE_NAMES",
    "smooth_noise",
    "random_rotation",
    "ellipsoid_rho",
    "gaussian_psf_blur",
    "camera_noise",
    "make_cell_field_3d",
    "make_isl_2d",
    "make_dic_membrane_2d",
    "make_fucci_spheroid",
    "write_dataset_3d",
    "write_dataset_2d_isl",
    "write_dataset_2d_dic",
    "write_fucci_dataset",
]

#: FUCCI phases, in the fixed order used for class indices.
PHASE_NAMES = ["G1", "S/G2/M", "G1/S", "early_G1"]

_WAVELENGTH_UM = 0.55  # green illumination for transmitted light


# ----------------------------------------------------------------------------- building blocks


def smooth_noise(shape: Sequence[int], sigma_vox, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise with zero mean and unit standard deviation.

    Args:
        shape: output shape (any number of dimensions).
        sigma_vox: correlation length (Gaussian sigma) in voxels, scalar or one per axis.
        rng: random generator.

    Returns:
        ``float32`` array of ``shape``. Large sigmas are filtered in Fourier space (periodic).
    """
    white = rng.standard_normal(tuple(shape), dtype=np.float32)
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    if sig.max() > 4:
        f = np.fft.rfftn(white)
        f = ndi.fourier_gaussian(f, sigma=sig, n=shape[-1])
        out = np.fft.irfftn(f, s=tuple(shape)).astype(np.float32)
    else:
        out = ndi.gaussian_filter(white, sig, mode="wrap")
    out -= out.mean()
    std = out.std()
    return out / std if std > 0 else out


def random_rotation(rng: np.random.Generator, max_tilt_deg: float | None = None) -> np.ndarray:
    """A random 3x3 rotation matrix acting on ``ZYX`` coordinates.

    Args:
        rng: random generator.
        max_tilt_deg: ``None`` for a uniformly random 3D rotation; otherwise a random rotation
            about the optical (z) axis followed by a tilt of at most this many degrees (cells
            lying flat on a coverslip).

    Returns:
        ``R`` with rows = the body axes expressed in ``ZYX`` coordinates
        (body coordinates are ``R @ p``).
    """
    if max_tilt_deg is None:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    th = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(th), np.sin(th)
    rz = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # rotation in the YX plane
    t = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg))
    ct, st = np.cos(t), np.sin(t)
    ty = np.array([[ct, 0, -st], [0, 1, 0], [st, 0, ct]])  # tilt (z mixes with y)
    return ty @ rz


def ellipsoid_rho(shape: Sequence[int], spacing_um: Sequence[float], centre_um, semi_axes_um, rotation,
                  margin_um: float = 0.0, box: tuple | None = None):
    """Normalised ellipsoid radius in the bounding box of one ellipsoid.

    Args:
        shape: ``ZYX`` shape of the full volume (voxels).
        spacing_um: ``ZYX`` voxel size (um).
        centre_um: ``ZYX`` centre (um).
        semi_axes_um: semi-axes (um) along the body axes (rows of ``rotation``).
        rotation: ``3x3`` rotation (see :func:`random_rotation`).
        margin_um: extra margin around the bounding box.
        box: optional tuple of 3 slices: evaluate on this sub-volume instead of the ellipsoid's
            own bounding box.

    Returns:
        ``(slices, rho)``: ``rho`` (``float32``) is 1 on the surface, < 1 inside, computed on the
        sub-volume ``slices`` of the full grid; ``None`` if the box misses the volume.
    """
    sp = np.asarray(spacing_um, float)
    c = np.asarray(centre_um, float)
    if box is not None:
        lo = np.array([b.start for b in box])
        hi = np.array([b.stop for b in box])
    else:
        r = float(np.max(semi_axes_um)) + margin_um + sp.max()
        lo = np.maximum(np.floor((c - r) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((c + r) / sp).astype(int) + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    axes = [(np.arange(lo[i], hi[i]) * sp[i] - c[i]).astype(np.float32) for i in range(3)]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    rot = np.asarray(rotation, np.float32)
    rho2 = np.zeros((hi - lo).tolist(), np.float32)
    for i in range(3):
        u = rot[i, 0] * z + rot[i, 1] * y + rot[i, 2] * x
        rho2 += (u / np.float32(semi_axes_um[i])) ** 2
    return tuple(slice(a, b) for a, b in zip(lo, hi)), np.sqrt(rho2)


def gaussian_psf_blur(image: np.ndarray, sigma_um, spacing_um) -> np.ndarray:
    """Convolve with a Gaussian PSF given in micrometres (per axis), ``float32`` out."""
    sig = np.asarray(sigma_um, float) / np.asarray(spacing_um, float)
    return ndi.gaussian_filter(image.astype(np.float32, copy=False), sig, mode="nearest", truncate=3.0)


def camera_noise(expected_photons: np.ndarray, rng: np.random.Generator, read_noise_e: float = 3.0,
                 offset: float = 100.0) -> np.ndarray:
    """Poisson shot noise + Gaussian read noise + camera offset.

    Args:
        expected_photons: expected photo-electrons per pixel (>= 0).
        rng: random generator.
        read_noise_e: read-noise standard deviation (electrons).
        offset: camera baseline added to every pixel (ADU = electrons here).

    Returns:
        ``float32`` image in electrons (not clipped, not rounded, like a dark-subtracted sCMOS
        frame plus its offset).
    """
    lam = np.clip(expected_photons, 0, None).astype(np.float64)
    img = rng.poisson(lam).astype(np.float32)
    img += rng.normal(0.0, read_noise_e, size=img.shape).astype(np.float32)
    img += np.float32(offset)
    return img


def _illumination_2d(shape_yx, rng, amplitude):
    """Smooth multiplicative illumination field ~1 +- amplitude (linear tilt + vignetting)."""
    ny, nx = shape_yx
    y = np.linspace(-1, 1, ny, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, :]
    gy, gx = rng.uniform(-1, 1, 2) * amplitude
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    vig = ((y - cy) ** 2 + (x - cx) ** 2) * (0.5 * amplitude)
    return (1.0 + gy * y + gx * x - vig).astype(np.float32)


def _relabel_present(labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Relabel to 1..N in order of first id; returns the new image and {old: new}."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    mapping = {}
    for new, old in enumerate(ids, start=1):
        lut[old] = new
        mapping[int(old)] = new
    return lut[labels], mapping


def _place_non_overlapping(rng, n, radii, low, high, min_factor=1.0, metric_axes=None, tries=400, inside=None):
    """Random sequential placement of ``n`` centres with ``|ci - cj| >= min_factor (ri + rj)``.

    ``low``/``high``: per-axis bounds (um); ``metric_axes``: axes used for the distance;
    ``inside``: optional predicate for an acceptable centre. When a centre cannot be placed in
    ``tries`` attempts the exclusion is relaxed by 10% (so objects may touch, rarely).
    """
    low = np.asarray(low, float)
    high = np.asarray(high, float)
    ax = slice(None) if metric_axes is None else metric_axes
    centres = []
    for i in range(n):
        f = min_factor
        placed = False
        while not placed:
            for _ in range(tries):
                c = low + rng.random(len(low)) * (high - low)
                if inside is not None and not inside(c, radii[i]):
                    continue
                ok = all(np.linalg.norm((c - cj)[ax]) >= f * (radii[i] + radii[j]) for j, cj in enumerate(centres))
                if ok:
                    centres.append(c)
                    placed = True
                    break
            f *= 0.9
            if f < 0.05:  # give up on exclusion
                centres.append(low + rng.random(len(low)) * (high - low))
                placed = True
    return np.array(centres).reshape(n, len(low))


# ----------------------------------------------------------------------------- 3D cell field


def _cell_field_params(**overrides) -> dict:
    p = dict(
        nucleus_long_axis_um=(6.0, 10.0),  # full length of the longest in-plane axis
        nucleus_aspect=(0.65, 0.9),  # short / long in-plane axis
        nucleus_height_um=(4.0, 6.0),  # full axial extent (adherent cells are flattened)
        max_tilt_deg=15.0,
        max_foreground_fraction=0.25,  # sizes shrink (isotropically) if nuclei would exceed this
        max_area_fraction=0.5,  # ... or would cover more than this of the field laterally
        cell_scale=(1.5, 2.0),  # cell / nucleus in-plane size
        boundary_roughness=0.12,  # relative boundary perturbation of cells (nuclei: 1/3 of it)
        # refractive index (RI): medium and increments
        n_medium=1.337,
        dn_cytoplasm=0.016,
        dn_nucleus=0.026,
        dn_nucleolus=0.042,
        dn_granule=0.02,
        granule_fraction=0.06,
        nucleoli_per_nucleus=(1, 3),
        nucleolus_radius_um=(0.6, 1.1),
        # DNA stain
        brightness_range=(0.5, 1.5),
        chromatin_texture=0.35,  # relative std of chromatin density
        chromatin_grain_um=0.45,
        heterochromatin_rim=0.3,
        nucleolus_dna=0.25,  # DNA density left in nucleoli
        psf_sigma_um=(0.75, 0.25),  # (axial, lateral) sigma: axial ~3x lateral
        haze_fraction=0.12,  # out-of-focus light as a fraction of the blurred signal
        haze_sigma_um=3.0,
        background_photons=6.0,
        background_variation=0.3,
        peak_photons=160.0,  # expected photons at DNA density 1 (brightness 1)
        read_noise_e=3.0,
        camera_offset=100.0,
        debris_per_1000um3=0.25,
        debris_peak=(1.5, 3.5),  # peak of a debris speck after the PSF, in units of nucleus density
        # bright-field
        bf_absorption=1.6,  # relative intensity loss per unit dn (blurred), scattering out of the NA
        bf_blur_um=(0.6, 0.25),
        defocus_coherence_um=1.2,  # axial range of the defocus contrast (partial coherence)
        defocus_lateral_um=0.35,
        defocus_contrast=0.12,  # condenser (partial-coherence) damping of the TIE term
        illumination_variation=0.06,
        bf_noise=0.008,  # relative Gaussian noise of the transmitted light
    )
    unknown = set(overrides) - set(p)
    if unknown:
        raise TypeError(f"unknown parameter(s) {sorted(unknown)}; known: {sorted(p)}")
    p.update(overrides)
    return p


def make_cell_field_3d(shape: Sequence[int] = (32, 128, 128), n_cells: int = 12,
                       spacing_um: Sequence[float] = (0.29, 0.29, 0.29), seed: int = 0, **params) -> dict:
    """A 3D field of adherent cells: bright-field signal, DNA-stain target, nucleus labels.

    Args:
        shape: ``ZYX`` shape in voxels.
        n_cells: number of cells (one nucleus each).
        spacing_um: ``ZYX`` voxel size in micrometres.
        seed: random seed.
        **params: overrides of the physical parameters (see ``_cell_field_params``), e.g.
            ``psf_sigma_um=(0.9, 0.3)``, ``peak_photons=50`` or ``brightness_range=(1, 1)``.
            Nucleus sizes (6-10 um long axis by default) shrink isotropically when the nuclei
            would not fit the field (``max_foreground_fraction``, ``max_area_fraction``), and
            their height shrinks when the stack is too thin.

    Returns:
        dict with

        * ``"signal"``: ``ZYX`` float32 transmitted-light intensity relative to the incident
          illumination (~1).
        * ``"target"``: ``ZYX`` float32 DNA stain in photo-electrons (camera offset included).
        * ``"labels"``: ``ZYX`` int32 nucleus instance labels (0 background, 1..N).
        * ``"ri"``: ``ZYX`` float32 refractive index.
        * ``"spacing_um"``: the voxel size tuple.
        * ``"brightness"``: float32 ``(N,)`` relative DNA brightness of nucleus ``k`` at ``k-1``.
        * ``"debris_zyx"``: int ``(M, 3)`` voxel positions of debris specks (not labelled).
    """
    p = _cell_field_params(**params)
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing_um, float)
    if len(shape) != 3 or len(sp) != 3:
        raise ValueError("shape and spacing_um must have 3 entries (ZYX)")
    ext = np.asarray(shape) * sp  # field size in um
    n = int(n_cells)

    # --- nucleus geometry (um), scaled to fit the field
    a = rng.uniform(*p["nucleus_long_axis_um"], n) / 2
    b = a * rng.uniform(*p["nucleus_aspect"], n)
    c = rng.uniform(*p["nucleus_height_um"], n) / 2
    if n:
        frac = np.sum(4 / 3 * np.pi * a * b * c) / np.prod(ext)
        area = np.sum(np.pi * a * b) / (ext[1] * ext[2])
        s = min(1.0, (p["max_foreground_fraction"] / frac) ** (1 / 3), np.sqrt(p["max_area_fraction"] / area))
        a, b, c = a * s, b * s, c * s
        c = c * min(1.0, 0.42 * ext[0] / c.max())
    r_plane = 0.5 * (a + b)
    zc_lo, zc_hi = 0.45 * ext[0], 0.55 * ext[0]
    centres = _place_non_overlapping(
        rng, n, r_plane, low=(zc_lo, 0.3 * r_plane.min(), 0.3 * r_plane.min()),
        high=(zc_hi, ext[1] - 0.3 * r_plane.min(), ext[2] - 0.3 * r_plane.min()),
        min_factor=1.05, metric_axes=[1, 2])
    rots = [random_rotation(rng, p["max_tilt_deg"]) for _ in range(n)]

    # --- shared texture fields
    rough = smooth_noise(shape, 1.5 / sp, rng)
    chromatin = smooth_noise(shape, p["chromatin_grain_um"] / sp, rng)
    granules = smooth_noise(shape, 0.3 / sp, rng) > ndtri(1 - p["granule_fraction"])

    dn = np.zeros(shape, np.float32)
    cyto = np.zeros(shape, bool)
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    dna = np.zeros(shape, np.float32)
    nucleolus = np.zeros(shape, bool)
    brightness = rng.uniform(*p["brightness_range"], n).astype(np.float32)
    rough_amp = p["boundary_roughness"]

    # cytoplasm (cells spread over the coverslip: centred a little below the nucleus)
    for k in range(n):
        cs = rng.uniform(*p["cell_scale"])
        off = rng.normal(0, 0.25, 2) * (cs - 1) * a[k]
        centre = centres[k] + np.array([-0.3 * c[k], off[0], off[1]])
        semi = (1.3 * c[k] + 0.5, cs * a[k], cs * b[k] * rng.uniform(0.9, 1.2))
        rot = random_rotation(rng, 5.0)
        res = ellipsoid_rho(shape, sp, centre, semi, rot)
        if res is None:
            continue
        sl, rho = res
        cyto[sl] |= (rho + rough_amp * rough[sl]) < 1
    dn[cyto] = p["dn_cytoplasm"]
    dn[cyto & granules] += p["dn_granule"]

    # nuclei, nucleoli, DNA density
    for k in range(n):
        semi = (c[k], a[k], b[k])
        res = ellipsoid_rho(shape, sp, centres[k], semi, rots[k])
        if res is None:
            continue
        sl, rho = res
        rho = rho + (rough_amp / 3) * rough[sl]
        inside = (rho < 1) & (rho < best[sl])
        labels[sl][inside] = k + 1
        best[sl][inside] = rho[inside]
        # nucleoli at random positions within half the nuclear radius
        nl = np.zeros(rho.shape, bool)
        for _ in range(rng.integers(p["nucleoli_per_nucleus"][0], p["nucleoli_per_nucleus"][1] + 1)):
            u = rng.normal(size=3)
            u = u / np.linalg.norm(u) * rng.uniform(0, 0.5)
            pos = centres[k] + rots[k].T @ (u * np.array(semi))
            rr = rng.uniform(*p["nucleolus_radius_um"]) * min(1.0, c[k] / 2.0)
            _, rho2 = ellipsoid_rho(shape, sp, pos, (rr * 0.8, rr, rr * rng.uniform(0.7, 1.0)),
                                    random_rotation(rng), box=sl)
            nl |= rho2 < 1
        nl &= inside
        nucleolus[sl] |= nl
        rim = np.exp(-(((1 - np.clip(rho, 0, 1)) / 0.12) ** 2))
        dens = brightness[k] * (1 + p["chromatin_texture"] * chromatin[sl] + p["heterochromatin_rim"] * rim)
        dens = np.clip(dens, 0, None) * np.where(nl, p["nucleolus_dna"], 1.0)
        dna[sl] = np.where(inside, dens, dna[sl])
    nuc = labels > 0
    dn[nuc] = p["dn_nucleus"] * (1 + 0.08 * chromatin[nuc])
    dn[nucleolus] = p["dn_nucleolus"]

    # debris: sub-resolution specks in the medium, away from nuclei (not labelled)
    n_deb = rng.poisson(p["debris_per_1000um3"] * np.prod(ext) / 1000.0)
    psf_vox = np.asarray([p["psf_sigma_um"][0], p["psf_sigma_um"][1], p["psf_sigma_um"][1]]) / sp
    psf_peak = 1.0 / ((2 * np.pi) ** 1.5 * np.prod(psf_vox))
    margin = np.ceil(3 * psf_vox).astype(int) + 1
    near_nuc = ndi.binary_dilation(nuc, iterations=3) if n_deb else None
    debris = []
    for _ in range(n_deb * 20):
        if len(debris) >= n_deb:
            break
        pos = np.array([rng.integers(min(m, s // 2), max(s - m, s // 2 + 1)) for m, s in zip(margin, shape)])
        lo, hi = np.maximum(pos - margin, 0), np.minimum(pos + margin + 1, shape)
        if near_nuc[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any():
            continue
        debris.append(pos)
        dna[tuple(pos)] += rng.uniform(*p["debris_peak"]) / psf_peak
        dn[tuple(pos)] += 0.05
    debris = np.array(debris, int).reshape(-1, 3)

    # --- DNA-stain image: PSF, haze, background, camera
    blurred = gaussian_psf_blur(dna, (psf_vox * sp).tolist(), sp)
    haze_sig = p["haze_sigma_um"] / sp
    f = ndi.fourier_gaussian(np.fft.rfftn(blurred), sigma=haze_sig, n=shape[-1])
    haze = np.fft.irfftn(f, s=shape).astype(np.float32)
    bg = 1 + p["background_variation"] * smooth_noise(shape, np.array([8.0, 20.0, 20.0]) / sp, rng)
    expected = p["peak_photons"] * (blurred + p["haze_fraction"] * haze) + p["background_photons"] * np.clip(bg, 0.2, None)
    target = camera_noise(expected, rng, p["read_noise_e"], p["camera_offset"])

    # --- transmitted light from the RI map
    absorb = gaussian_psf_blur(dn, [p["bf_blur_um"][0], p["bf_blur_um"][1], p["bf_blur_um"][1]], sp)
    # defocus (TIE): dI(z) = -int (z - z') w(z - z') lap_xy dn(z') dz', w Gaussian of width s
    #   = s^3 sqrt(2 pi) d/dz lap_xy (G_s * dn)
    s = p["defocus_coherence_um"]
    sig = np.array([s, p["defocus_lateral_um"], p["defocus_lateral_um"]]) / sp
    dzyy = ndi.gaussian_filter(dn, sig, order=(1, 2, 0), mode="nearest") / (sp[0] * sp[1] ** 2)
    dzxx = ndi.gaussian_filter(dn, sig, order=(1, 0, 2), mode="nearest") / (sp[0] * sp[2] ** 2)
    defocus = (s ** 3 * np.sqrt(2 * np.pi)) * (dzyy + dzxx)
    illum = _illumination_2d(shape[1:], rng, p["illumination_variation"])[None]
    illum = illum * (1 + 0.01 * np.linspace(-1, 1, shape[0], dtype=np.float32))[:, None, None]
    signal = illum * (1 - p["bf_absorption"] * absorb + p["defocus_contrast"] * defocus)
    signal = signal + rng.normal(0, p["bf_noise"], shape).astype(np.float32)
    return {
        "signal": np.clip(signal, 0, None).astype(np.float32),
        "target": target.astype(np.float32),
        "labels": labels,
        "ri": (p["n_medium"] + dn).astype(np.float32),
        "spacing_um": tuple(float(v) for v in sp),
        "brightness": brightness,
        "debris_zyx": debris,
    }
