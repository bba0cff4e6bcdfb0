"""3D adherent-cell phantoms: bright-field stack from a refractive-index map, DNA-stain target, nucleus labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from common.synthetic.optics import (_illumination_2d, _place_non_overlapping, blur_wide, camera_noise, ellipsoid_rho,
                                     gaussian_psf_blur, random_rotation, smooth_noise)

__all__ = ["cell_field_params", "make_cell_field_3d"]


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
        debris_dn=0.05,  # refractive-index increment of a debris speck (0: invisible in bright field)
        # out-of-stack haze: light from nuclei above/below the imaged stack (thick samples); it reaches the
        # stain image as broad blobs and is absent from the transmitted light (0 = none, the default)
        out_of_stack_haze=0.0,  # peak of that haze in units of nucleus density
        out_of_stack_per_1000um2=4.0,  # such nuclei per 1000 um^2 of field
        out_of_stack_sigma_um=3.0,  # lateral blur of their light
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


def _out_of_stack(shape, sp, rng, p) -> np.ndarray:
    """Broad blobs of out-of-stack nuclei's light, peak ~1, constant over z with a slow axial ramp."""
    area = shape[1] * sp[1] * shape[2] * sp[2]
    m = rng.poisson(p["out_of_stack_per_1000um2"] * area / 1000.0)
    img = np.zeros(shape[1:], np.float32)
    for y, x, w in zip(rng.integers(0, shape[1], m), rng.integers(0, shape[2], m), rng.uniform(0.5, 1.5, m)):
        img[y, x] += w
    sig = p["out_of_stack_sigma_um"] / sp[1:]
    img = ndi.gaussian_filter(img, sig, mode="constant") * (2 * np.pi * float(np.prod(sig)))
    ramp = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), shape[0], dtype=np.float32)
    return (ramp[:, None, None] * img[None]).astype(np.float32)


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
        dn[tuple(pos)] += p["debris_dn"]
    debris = np.array(debris, int).reshape(-1, 3)

    # --- DNA-stain image: PSF, haze, background, camera
    blurred = gaussian_psf_blur(dna, (psf_vox * sp).tolist(), sp)
    haze = blur_wide(blurred, p["haze_sigma_um"] / sp)
    if p["out_of_stack_haze"] > 0:
        oos = _out_of_stack(shape, sp, np.random.default_rng([seed, 1]), p)  # own stream: the rest is unchanged
        haze = haze + (p["out_of_stack_haze"] / max(p["haze_fraction"], 1e-6)) * oos
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
