"""Spotlight method package (Kalinin et al. 2025): Otsu standardisation, foreground-aware loss, evaluation protocol.

* :mod:`common.spotlight.normalise`: :class:`OtsuStandardized` (per channel ``(x - t_otsu) / std``)
  and :func:`check_foreground` (every training target has a usable foreground, checked up front).
* :mod:`common.spotlight.loss`: :class:`SpotlightLoss` (``lambda`` masked MSE + ``(1 - lambda)``
  soft Dice of a tunable sigmoid) and its parts.
* :mod:`common.spotlight.evaluation`: the protocol's functions (pixel metrics, segmentation,
  features, threshold sweep); :mod:`common.spotlight.report`: :func:`evaluate_dataset` and its
  figures. Both are imported on use (they pull in the metrics), not by ``import common.spotlight``.

The package imports only the generic layer of ``common``.
"""

from common.spotlight.loss import SpotlightLoss, masked_mse, soft_dice_loss, soft_threshold
from common.spotlight.normalise import NoForegroundError, OtsuStandardize, OtsuStandardized, check_foreground

__all__ = ["OtsuStandardize", "OtsuStandardized", "NoForegroundError", "check_foreground",
           "soft_threshold", "masked_mse", "soft_dice_loss", "SpotlightLoss"]
