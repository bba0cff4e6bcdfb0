"""Intensity and geometry augmentations from MONAI, one switch each, for 2D/3D image + label crops.

:func:`augmentations` returns a list of MONAI dictionary transforms to put after the random crop
(the image already normalised per image). Every switch is a probability (``0`` = off; ``flip`` and
``rot90`` are booleans) so a bundle config exposes one value per augmentation. Geometry
transforms move the image and every ``label_keys`` entry together (labels with nearest-neighbour
interpolation, so a binary mask stays binary); intensity transforms touch the image only.

==============  =====================================================  ==================================
switch          MONAI transform                                        what it does to the image
==============  =====================================================  ==================================
flip            ``RandFlipd`` (each spatial axis, p = 0.5)              mirror
rot90           ``RandRotate90d`` (first two spatial axes, p = 0.5)     k x 90 degrees (k in 1..3)
zoom            ``RandZoomd`` (``zoom_range``, keep size)               scale by a factor in the range
contrast        ``RandAdjustContrastd`` (``gamma_range``)               gamma on the min-max range
noise           ``RandGaussianNoised`` (std ``noise_std``)              additive Gaussian noise
smooth          ``RandGaussianSmoothd`` (sigma ``smooth_sigma``)        Gaussian blur (defocus)
bias_field      ``RandBiasFieldd`` (``bias_coeff``, degree 3)           smooth multiplicative gradient
==============  =====================================================  ==================================
"""

from __future__ import annotations

from typing import Sequence

from monai import transforms as mt

from common.errors import ZooError

__all__ = ["augmentations", "AugmentationError", "SWITCHES"]

#: the switches of :func:`augmentations`, in the order the transforms are applied
SWITCHES = ("flip", "rot90", "zoom", "contrast", "noise", "smooth", "bias_field")


class AugmentationError(ZooError, ValueError):
    """An augmentation probability outside ``[0, 1]`` or a malformed range."""


def _prob(name: str, p) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise AugmentationError(f"augmentation {name!r}: probability must be in [0, 1], got {p}")
    return p


def _range(name: str, r) -> tuple[float, float]:
    r = tuple(float(v) for v in r)
    if len(r) != 2 or r[0] > r[1]:
        raise AugmentationError(f"{name} must be (low, high) with low <= high, got {r}")
    return r


def augmentations(image_keys: str | Sequence[str] = "image", label_keys: str | Sequence[str] = ("label",),
                  spatial_dims: int = 2, flip: bool = True, rot90: bool = True, zoom: float = 0.0,
                  contrast: float = 0.0, noise: float = 0.0, smooth: float = 0.0, bias_field: float = 0.0,
                  zoom_range: Sequence[float] = (0.8, 1.25), gamma_range: Sequence[float] = (0.7, 1.5),
                  noise_std: float = 0.1, smooth_sigma: Sequence[float] = (0.25, 1.5),
                  bias_coeff: Sequence[float] = (0.0, 0.3), label_is_mask: bool = True) -> list:
    """The MONAI dictionary transforms for the switches that are on (module table), in order.

    Args:
        image_keys: the (normalised) image key(s); intensity transforms apply to them only.
        label_keys: keys moved with the image by the geometry transforms (masks or stains).
        spatial_dims: 2 (``CYX``) or 3 (``CZYX``; rot90 turns the last two axes).
        flip, rot90: on/off.
        zoom, contrast, noise, smooth, bias_field: probabilities per crop (0 = off).
        zoom_range, gamma_range, noise_std, smooth_sigma, bias_coeff: their ranges.
        label_is_mask: zoom labels with nearest-neighbour interpolation (a stain target: False).

    Returns:
        list of ``monai.transforms`` dictionary transforms (empty when every switch is off).
    """
    img = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    lab = [label_keys] if isinstance(label_keys, str) else list(label_keys or [])
    keys = img + lab
    sd = int(spatial_dims)
    out = []
    if flip:
        out += [mt.RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(sd)]
    if rot90:
        out.append(mt.RandRotate90d(keys, prob=0.5, spatial_axes=(sd - 2, sd - 1)))
    if _prob("zoom", zoom) > 0:
        lo, hi = _range("zoom_range", zoom_range)
        modes = ["bilinear" if sd == 2 else "trilinear"] * len(img) + \
            ["nearest-exact" if label_is_mask else ("bilinear" if sd == 2 else "trilinear")] * len(lab)
        out.append(mt.RandZoomd(keys, prob=zoom, min_zoom=lo, max_zoom=hi, mode=modes, keep_size=True,
                                padding_mode="reflect"))
    if _prob("contrast", contrast) > 0:
        out.append(mt.RandAdjustContrastd(img, prob=contrast, gamma=_range("gamma_range", gamma_range)))
    if _prob("noise", noise) > 0:
        out.append(mt.RandGaussianNoised(img, prob=noise, mean=0.0, std=float(noise_std)))
    if _prob("smooth", smooth) > 0:
        s = _range("smooth_sigma", smooth_sigma)
        out.append(mt.RandGaussianSmoothd(img, prob=smooth, sigma_x=s, sigma_y=s,
                                          **({"sigma_z": s} if sd == 3 else {})))
    if _prob("bias_field", bias_field) > 0:
        out.append(mt.RandBiasFieldd(img, prob=bias_field, degree=3, coeff_range=_range("bias_coeff", bias_coeff)))
    return out
