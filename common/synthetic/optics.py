"""Shared optics, noise and geometry of the phantoms: PSF blur, camera noise, illumination, shapes, placement."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["smooth_noise", "random_rotation", "ellipsoid_rho", "gaussian_psf_blur", "blur_wide", "camera_noise",
           "star_rho_2d", "ellipse_rho_2d"]

_WAVELENGTH_UM = 0.55  # green illumination for transmitted light


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
