"""FUCCI spheroid phantoms: dense nuclei with Cy3/GFP cell-cycle reporters and Hoechst, 5 um z-steps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.synthetic.optics import (_place_non_overlapping, _relabel_present, camera_noise, ellipsoid_rho,
                                     gaussian_psf_blur, random_rotation, smooth_noise)

__all__ = ["PHASE_NAMES", "make_fucci_spheroid"]

PHASE_NAMES = ["G1", "S/G2/M", "G1/S", "early_G1"]


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
