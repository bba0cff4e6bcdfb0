"""Figures and tables for reports: orthogonal max-projections, loss curves, Markdown tables.

All figures are written atomically (temporary file + rename) with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["orthogonal_mips", "save_mip_figure", "markdown_table", "write_json", "save_figure"]


def orthogonal_mips(volume: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), reduce=np.max) -> np.ndarray:
    """Tile the three orthogonal projections of a ``ZYX`` volume into one 2D image.

    Layout (as in Fiji's orthogonal views)::

        [ YX  | ZY^T ]
        [ ZX  |  0   ]

    The ``z`` axis is stretched by ``spacing[0] / spacing[2]`` (nearest neighbour) so that
    anisotropic stacks look right. Returns a float array of shape ``(Y + Z', X + Z')``.
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"orthogonal_mips expects ZYX, got shape {v.shape}")
    zf = max(1, int(round(spacing[0] / spacing[2])))
    yx = reduce(v, axis=0)
    zx = np.repeat(reduce(v, axis=1), zf, axis=0)  # (Z', X)
    zy = np.repeat(reduce(v, axis=2), zf, axis=0)  # (Z', Y)
    nz, ny, nx = zx.shape[0], yx.shape[0], yx.shape[1]
    out = np.full((ny + nz, nx + nz), np.nan, np.float32)
    out[:ny, :nx] = yx
    out[:ny, nx:] = zy.T
    out[ny:, :nx] = zx
    return out


def _atomic_path(path: str, suffix: str) -> str:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=d)
    os.close(fd)
    return tmp


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    tmp = _atomic_path(path, os.path.splitext(path)[1] or ".png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_mip_figure(path: str, volumes: Mapping[str, np.ndarray], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    overlays: Mapping[str, np.ndarray] | None = None, percentiles=(0.5, 99.8), title: str = "") -> str:
    """One panel per named ``ZYX`` volume, each its orthogonal max-projections, side by side.

    ``overlays`` maps a panel name to a label volume whose projected outlines are drawn on top.
    Intensities are clipped to each volume's ``percentiles`` for display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    overlays = dict(overlays or {})
    n = len(volumes)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.4), squeeze=False)
    for ax, (name, vol) in zip(axes[0], volumes.items()):
        m = orthogonal_mips(vol, spacing)
        finite = m[np.isfinite(m)]
        lo, hi = np.percentile(finite, percentiles) if finite.size else (0, 1)
        ax.imshow(np.clip(m, lo, hi), cmap="gray", interpolation="nearest")
        if name in overlays:
            lab = orthogonal_mips(overlays[name].astype(np.float32), spacing)
            lab = np.nan_to_num(lab).astype(np.int64)
            edge = np.ma.masked_where(~find_boundaries(lab, mode="inner"), np.ones_like(lab))
            ax.imshow(edge, cmap="autumn", alpha=0.9, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A Markdown table from a list of dicts (one row each)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str, obj) -> str:
    """Write JSON atomically (numpy scalars converted)."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o)}")

    tmp = _atomic_path(path, ".json")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=default)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
