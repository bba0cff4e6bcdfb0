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
    "blur_wide",
    "camera_noise",
    "cell_field_params",
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


def blur_wide(image: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian blur with a wide kernel (e.g. out-of-focus haze), computed on a decimated grid.

    Non-periodic (``nearest`` edges). ``sigma_vox``: scalar or per-axis sigma in voxels.
    """
    sig = np.broadcast_to(np.asarray(sigma_vox, float), (image.ndim,))
    f = np.maximum(np.floor(sig / 2.0), 1).astype(int)
    if np.all(f == 1):
        return ndi.gaussian_filter(image.astype(np.float32, copy=False), sig, mode="nearest")
    shape = np.asarray(image.shape)
    nb = -(-shape // f)  # blocks per axis
    padded = np.pad(image.astype(np.float32, copy=False), [(0, int(p)) for p in nb * f - shape], mode="edge")
    small = padded.reshape([v for pair in zip(nb, f) for v in pair]).mean(axis=tuple(range(1, 2 * image.ndim, 2)))
    small = ndi.gaussian_filter(small, sig / f, mode="nearest")
    out = ndi.zoom(small, f, order=1, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, int(v)) for v in shape)].astype(np.float32, copy=False)


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


def cell_field_params(**overrides) -> dict:
    """Physical parameters of :func:`make_cell_field_3d` (lengths in um), with ``overrides``.

    Raises ``TypeError`` for an unknown name, so a typo never passes silently.
    """
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
        bf_absorption=0.6,  # relative intensity loss per unit dn (blurred), scattering out of the NA
        bf_blur_um=(0.6, 0.25),
        defocus_coherence_um=1.2,  # axial range of the defocus contrast (partial coherence)
        defocus_lateral_um=0.35,
        defocus_contrast=0.8,  # condenser (partial-coherence) damping of the TIE term
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
        **params: overrides of the physical parameters (see ``cell_field_params``), e.g.
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
    p = cell_field_params(**params)
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
    m = 0.3 * float(r_plane.min(initial=0.0))
    centres = _place_non_overlapping(rng, n, r_plane, low=(zc_lo, m, m), high=(zc_hi, ext[1] - m, ext[2] - m),
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
    haze = blur_wide(blurred, p["haze_sigma_um"] / sp)
    bg = 1 + p["background_variation"] * smooth_noise(shape, np.array([8.0, 20.0, 20.0]) / sp, rng)
    expected = (p["peak_photons"] * (blurred + p["haze_fraction"] * haze)
                + p["background_photons"] * np.clip(bg, 0.2, None))
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


# ----------------------------------------------------------------------------- 2D helpers


def _box2d(shape, centre_px, radius_px):
    lo = np.maximum(np.floor(np.asarray(centre_px) - radius_px).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(centre_px) + radius_px).astype(int) + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    y = (np.arange(lo[0], hi[0], dtype=np.float32) - np.float32(centre_px[0]))[:, None]
    x = (np.arange(lo[1], hi[1], dtype=np.float32) - np.float32(centre_px[1]))[None, :]
    return sl, y, x


def star_rho_2d(shape: Sequence[int], centre_px, radius_px: float, harmonics: np.ndarray, phases: np.ndarray):
    """Normalised radius ``r / R(theta)`` of a star-convex blob (1 on its outline).

    ``R(theta) = radius_px * (1 + sum_k harmonics[k] cos((k + 2) theta + phases[k]))``: mode 2 makes
    it elongated, higher modes make lobes. Returns ``(slices, rho)`` on the blob's bounding box,
    or ``None`` if it misses the image.
    """
    amp = 1 + np.sum(np.abs(harmonics))
    res = _box2d(shape, centre_px, radius_px * amp + 2)
    if res is None:
        return None
    sl, y, x = res
    th = np.arctan2(y, x)
    rad = np.ones_like(th)
    for k, (h, ph) in enumerate(zip(harmonics, phases)):
        rad = rad + np.float32(h) * np.cos((k + 2) * th + np.float32(ph))
    rad = np.float32(radius_px) * np.clip(rad, 0.4, None)
    return sl, np.sqrt(y ** 2 + x ** 2) / rad


def ellipse_rho_2d(shape: Sequence[int], centre_px, semi_axes_px, angle: float, box=None):
    """Normalised radius of a rotated ellipse (1 on the outline), on its bounding box or ``box``."""
    if box is None:
        res = _box2d(shape, centre_px, max(semi_axes_px) + 2)
        if res is None:
            return None
        sl, y, x = res
    else:
        sl = box
        y = (np.arange(box[0].start, box[0].stop, dtype=np.float32) - np.float32(centre_px[0]))[:, None]
        x = (np.arange(box[1].start, box[1].stop, dtype=np.float32) - np.float32(centre_px[1]))[None, :]
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (c * x + s * y) / np.float32(semi_axes_px[0])
    v = (-s * x + c * y) / np.float32(semi_axes_px[1])
    return sl, np.sqrt(u ** 2 + v ** 2)


def _dome(rho):
    """Height profile of a spread cell / nucleus: 1 at the centre, 0 at rho >= 1."""
    return np.sqrt(np.clip(1 - rho ** 2, 0, None)).astype(np.float32)


def _laplacian_2d(img, sigma_px):
    return ndi.gaussian_laplace(img.astype(np.float32, copy=False), sigma_px, mode="nearest")


# ----------------------------------------------------------------------------- 2D ISL (BF + phase -> DAPI)


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


# ----------------------------------------------------------------------------- 2D DIC -> membrane


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


# ----------------------------------------------------------------------------- FUCCI spheroid


def make_fucci_spheroid(shape: Sequence[int] = (24, 128, 128), n_nuclei: int = 40,
                        spacing_um: Sequence[float] = (5.0, 0.5, 0.5), seed: int = 0,
                        phase_probabilities: Sequence[float] = (0.35, 0.35, 0.15, 0.15),
                        attenuation_length_um: float = 60.0, centre_dimming: float = 0.4,
                        psf_sigma_um: Sequence[float] = (2.0, 0.35), peak_photons: float = 250.0) -> dict:
    """A dense spheroid of nuclei with FUCCI cell-cycle reporters and Hoechst.

    Nuclei are randomly oriented ellipsoids (7-11 um long axis) packed in a sphere at ~40%
    volume fraction (touching neighbours occur); with 5 um z-steps each spans only a few slices.
    Every nucleus gets a phase: ``"G1"`` (Cy3 / mKO2-hCdt1 only), ``"S/G2/M"`` (GFP /
    mAG-hGeminin only), ``"G1/S"`` (both) or ``"early_G1"`` (neither; Hoechst only). A reporter
    that is on has a per-nucleus level 0.6-1.5, one that is off 0-0.05 (leakage). The spheroid
    rests on the well bottom near ``z = 0`` (inverted microscope: small z is closest to the
    objective). Emission is attenuated by scattering:
    ``exp(-(z - z_bottom) / attenuation_length_um)`` above the bottom of the spheroid and ``1 - centre_dimming * (1 - r / R)`` towards its centre, at most a factor
    ~3, so the ratio on / off stays > 4 and a threshold separates the phases. Images are blurred
    by an anisotropic Gaussian PSF, plus haze, Poisson and read noise.

    Args:
        shape: ``ZYX`` size (voxels).
        n_nuclei: number of nuclei.
        spacing_um: ``ZYX`` voxel size (um).
        seed: random seed.
        phase_probabilities: probabilities of the phases in :data:`PHASE_NAMES` order.
        attenuation_length_um: scattering length along z.
        centre_dimming: relative dimming at the spheroid centre.
        psf_sigma_um: (axial, lateral) Gaussian PSF sigma (um).
        peak_photons: expected photons at reporter / DNA density 1.

    Returns:
        dict with ``"image"`` ``(3, Z, Y, X)`` float32 channels ``[Cy3, GFP, Hoechst]``
        (photo-electrons incl. a 100 e- offset), ``"labels"`` ``(Z, Y, X)`` int32,
        ``"phases"`` ``{label: phase}``, ``"phase_names"`` (:data:`PHASE_NAMES`),
        ``"channel_names"``, ``"spacing_um"``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing_um, float)
    ext = np.asarray(shape) * sp
    n = int(n_nuclei)

    a = rng.uniform(3.5, 5.5, n)
    semi = np.stack([a, a * rng.uniform(0.75, 0.95, n), a * rng.uniform(0.6, 0.85, n)], 1)
    vol = np.sum(4 / 3 * np.pi * np.prod(semi, 1))
    radius = max((vol / 0.4 * 3 / (4 * np.pi)) ** (1 / 3), 1e-3)
    r_fit = 0.45 * min(ext[1], ext[2], ext[0] * 1.6)
    if radius > r_fit:  # shrink nuclei so that the spheroid fits the field
        semi *= r_fit / radius
        radius = r_fit
    centre = np.array([min(0.45 * ext[0], radius + 0.05 * ext[0]), ext[1] / 2, ext[2] / 2])
    centre = centre + np.array([0, *rng.normal(0, 0.03, 2) * ext[1:]])
    r_eq = np.cbrt(np.prod(semi, 1))

    def inside(c, r):
        return np.linalg.norm(c - centre) <= radius - 0.5 * r

    centres = _place_non_overlapping(rng, n, r_eq, low=centre - radius, high=centre + radius, min_factor=0.85,
                                     inside=inside)
    phase_idx = rng.choice(len(PHASE_NAMES), size=n, p=np.asarray(phase_probabilities) / np.sum(phase_probabilities))
    on = {0: (True, False), 1: (False, True), 2: (True, True), 3: (False, False)}

    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    dens = np.zeros((3,) + shape, np.float32)
    texture = smooth_noise(shape, np.array([1.0, 0.6, 0.6]) / sp, rng)
    for k in range(n):
        rot = random_rotation(rng)
        res = ellipsoid_rho(shape, sp, centres[k], semi[k], rot)
        if res is None:
            continue
        sl, rho = res
        ins = (rho < 1) & (rho < best[sl])
        if not ins.any():
            continue
        labels[sl][ins] = k + 1
        best[sl][ins] = rho[ins]
        levels = []
        for ch in range(2):
            levels.append(rng.uniform(0.6, 1.5) if on[int(phase_idx[k])][ch] else rng.uniform(0.0, 0.05))
        levels.append(rng.uniform(0.7, 1.3))  # Hoechst
        tex = texture[sl]
        for ch in range(3):
            amp = 0.3 if ch == 2 else 0.1  # chromatin texture vs diffuse nuclear reporters
            val = levels[ch] * np.clip(1 + amp * tex, 0, None)
            dens[ch][sl] = np.where(ins, val, dens[ch][sl])

    labels, mapping = _relabel_present(labels)
    phases = {new: PHASE_NAMES[int(phase_idx[old - 1])] for old, new in mapping.items()}

    # scattering: dimmer deeper in z and towards the spheroid centre
    zz = (np.arange(shape[0]) * sp[0])[:, None, None]
    yy = (np.arange(shape[1]) * sp[1])[None, :, None]
    xx = (np.arange(shape[2]) * sp[2])[None, None, :]
    r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    att = np.exp(-np.clip(zz - (centre[0] - radius), 0, None) / attenuation_length_um)
    att = (att * (1 - centre_dimming * np.clip(1 - r / radius, 0, 1))).astype(np.float32)
    psf = (psf_sigma_um[0], psf_sigma_um[1], psf_sigma_um[1])
    out = []
    for ch, (bg, peak) in enumerate([(6.0, peak_photons), (6.0, peak_photons), (8.0, 1.2 * peak_photons)]):
        blurred = gaussian_psf_blur(dens[ch] * att, psf, sp)
        haze = gaussian_psf_blur(blurred, (6.0, 4.0, 4.0), sp)
        expected = peak * (blurred + 0.15 * haze) + bg
        out.append(camera_noise(expected, rng, 3.0, 100.0))
    return {
        "image": np.stack(out).astype(np.float32),
        "labels": labels,
        "phases": phases,
        "phase_names": list(PHASE_NAMES),
        "channel_names": ["Cy3", "GFP", "Hoechst"],
        "spacing_um": tuple(float(v) for v in sp),
    }


# ----------------------------------------------------------------------------- writers


def _write_manifest(path: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def _as_uint16_labels(labels: np.ndarray) -> np.ndarray:
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError("more than 65535 labels cannot be written as uint16")
    return labels.astype(np.uint16)


def write_dataset_3d(out_dir: str | os.PathLike, n_volumes: int = 4, shape: Sequence[int] = (32, 128, 128),
                     seed: int = 0, spacing_um: Sequence[float] = (0.29, 0.29, 0.29), **params) -> str:
    """Write :func:`make_cell_field_3d` volumes as OME-TIFF plus a ``manifest.csv``.

    Files: ``signal_XX.ome.tif`` (bright field), ``target_XX.ome.tif`` (DNA stain),
    ``labels_XX.ome.tif`` (uint16 nucleus labels), all ``ZYX`` with the voxel size; volume ``i``
    uses seed ``seed + i``. The manifest has the header ``path_signal,path_target,path_label``
    and paths relative to its folder.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_volumes)):
        d = make_cell_field_3d(shape=shape, spacing_um=spacing_um, seed=seed + i, **params)
        names = (f"signal_{i:02d}.ome.tif", f"target_{i:02d}.ome.tif", f"labels_{i:02d}.ome.tif")
        write_ome_tiff(os.path.join(out_dir, names[0]), d["signal"], "ZYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), d["target"], "ZYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[2]), _as_uint16_labels(d["labels"]), "ZYX", d["spacing_um"])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), ["path_signal", "path_target", "path_label"], rows)


def write_dataset_2d_isl(out_dir: str | os.PathLike, n_images: int = 4, shape: Sequence[int] = (256, 256),
                         seed: int = 0, **params) -> str:
    """Write :func:`make_isl_2d` images as OME-TIFF plus a ``manifest.csv``.

    Files: ``brightfield_XX.ome.tif`` (``CYX``: bright field at -dz, +dz, phase contrast),
    ``dapi_XX.ome.tif`` (``YX``), ``nuclei_XX.ome.tif`` (``YX`` uint16 labels) and
    ``cells_XX.ome.tif`` (``YX`` uint16 labels). Manifest columns
    ``path_signal,path_target,path_label,path_cells`` (relative paths); image ``i`` uses
    seed ``seed + i``. ``params`` go to :func:`make_isl_2d`.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_images)):
        d = make_isl_2d(shape=shape, seed=seed + i, **params)
        sig = np.concatenate([d["brightfield"], d["phase"][None]], 0)
        names = (f"brightfield_{i:02d}.ome.tif", f"dapi_{i:02d}.ome.tif", f"nuclei_{i:02d}.ome.tif",
                 f"cells_{i:02d}.ome.tif")
        write_ome_tiff(os.path.join(out_dir, names[0]), sig, "CYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), d["dapi"], "YX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[2]), _as_uint16_labels(d["nuclei"]), "YX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[3]), _as_uint16_labels(d["cells"]), "YX", d["spacing_um"])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"),
                           ["path_signal", "path_target", "path_label", "path_cells"], rows)


def write_dataset_2d_dic(out_dir: str | os.PathLike, n_images: int = 4, shape: Sequence[int] = (256, 256),
                         seed: int = 0, n_planes: int = 1, **params) -> str:
    """Write :func:`make_dic_membrane_2d` images as OME-TIFF plus a ``manifest.csv``.

    Files: ``dic_XX.ome.tif`` (``CYX``, one channel per focal plane), ``membrane_XX.ome.tif``
    (``YX``), ``cells_XX.ome.tif`` (``YX`` uint16 labels). Manifest columns
    ``path_signal,path_target,path_label`` (relative paths); image ``i`` uses seed ``seed + i``.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_images)):
        d = make_dic_membrane_2d(shape=shape, seed=seed + i, n_planes=n_planes, **params)
        names = (f"dic_{i:02d}.ome.tif", f"membrane_{i:02d}.ome.tif", f"cells_{i:02d}.ome.tif")
        write_ome_tiff(os.path.join(out_dir, names[0]), d["dic"], "CYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), d["membrane"], "YX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[2]), _as_uint16_labels(d["cells"]), "YX", d["spacing_um"])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), ["path_signal", "path_target", "path_label"], rows)


def write_fucci_dataset(out_dir: str | os.PathLike, n_spheroids: int = 4, shape: Sequence[int] = (24, 128, 128),
                        seed: int = 0, n_nuclei: int = 40, spacing_um: Sequence[float] = (5.0, 0.5, 0.5),
                        **params) -> str:
    """Write :func:`make_fucci_spheroid` volumes plus a ``manifest.csv``.

    Files: ``image_XX.ome.tif`` (``CZYX``: Cy3, GFP, Hoechst), ``labels_XX.ome.tif`` (``ZYX``
    uint16), ``phases_XX.csv`` (header ``label,phase``). Manifest columns
    ``path_image,path_label,path_phases`` (relative paths); spheroid ``i`` uses seed ``seed + i``.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_spheroids)):
        d = make_fucci_spheroid(shape=shape, n_nuclei=n_nuclei, spacing_um=spacing_um, seed=seed + i, **params)
        names = (f"image_{i:02d}.ome.tif", f"labels_{i:02d}.ome.tif", f"phases_{i:02d}.csv")
        write_ome_tiff(os.path.join(out_dir, names[0]), d["image"], "CZYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), _as_uint16_labels(d["labels"]), "ZYX", d["spacing_um"])
        _write_manifest(os.path.join(out_dir, names[2]), ["label", "phase"],
                        [(lab, ph) for lab, ph in sorted(d["phases"].items())])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), ["path_image", "path_label", "path_phases"], rows)
