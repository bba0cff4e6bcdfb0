"""Figures and tables for reports, written atomically: max-projections, bar plots that show n, Markdown tables.

Orthogonal max-projections with a mid z-slice, scale and colour bars, outlines; bar plots that
show n; Markdown tables.

All figures are written atomically (temporary file + rename) with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["orthogonal_mips", "save_mip_figure", "save_bar_plot", "markdown_table", "write_json", "write_text",
           "save_figure"]


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


def _nice_length(extent: float) -> float:
    """A round scale-bar length (1, 2, 5 x 10^k) near a fifth of ``extent``."""
    target = max(extent / 5.0, 1e-9)
    k = np.floor(np.log10(target))
    for m in (5, 2, 1):
        if m * 10 ** k <= target:
            return float(m * 10 ** k)
    return float(10 ** k)


def _scale_bar(ax, pixel_um: float | None, width_px: int, height_px: int, colour: str = "white") -> None:
    """A scale bar in the lower left corner: ``pixel_um`` micrometres per pixel (``None``: in pixels)."""
    from matplotlib.patches import Rectangle

    size = pixel_um if pixel_um else 1.0
    length = _nice_length(width_px * size)
    n_px = length / size
    x0, y0 = 0.05 * width_px, 0.93 * height_px
    ax.add_patch(Rectangle((x0, y0), n_px, max(1.0, 0.015 * height_px), color=colour, lw=0))
    label = (f"{length:g} \u00b5m" if pixel_um else f"{length:g} px")
    ax.text(x0 + n_px / 2, y0 - 0.015 * height_px, label, color=colour, ha="center", va="bottom", fontsize=8)


def save_mip_figure(path: str, volumes: Mapping[str, np.ndarray], spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
                    overlays: Mapping[str, np.ndarray] | None = None, percentiles=(0.5, 99.8), title: str = "",
                    units: Mapping[str, str] | str | None = None, outlines: Mapping[str, np.ndarray] | None = None,
                    outline_label: str = "", mid_slice: bool = True) -> str:
    """One column per named ``ZYX`` volume: orthogonal max-projections on top, the mid z-slice below.

    Every panel has a scale bar (micrometres from ``spacing``, pixels when ``spacing`` is ``None``) and
    each column a colour bar labelled with its ``units``. Intensities are clipped to each volume's
    ``percentiles``; the mid z-slice uses the same range as its projections.

    Args:
        path: the PNG to write (atomically).
        volumes: panel title -> ``ZYX`` volume.
        spacing: ``ZYX`` voxel size in micrometres, or ``None`` when unknown.
        overlays: panel title -> label volume whose instance outlines are drawn (projected and on the slice).
        units: one unit for every colour bar, or panel title -> unit (e.g. ``"z-score"``).
        outlines: panel title -> binary volume (e.g. a segmentation of the prediction) whose outline is
            drawn as a contour on that panel; ``outline_label`` names it in the legend.
        mid_slice: add the row of mid z-slices.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from skimage.segmentation import find_boundaries

    overlays, outlines = dict(overlays or {}), dict(outlines or {})
    sp = tuple(float(v) for v in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    n = len(volumes)
    rows = 2 if mid_slice else 1
    first = next(iter(volumes.values()))
    m0 = orthogonal_mips(first, sp)
    aspect = m0.shape[0] / m0.shape[1]
    fig, axes = plt.subplots(rows, n, figsize=(4.2 * n, 3.3 * aspect + (3.3 * first.shape[1] / first.shape[2] if mid_slice else 0) + 0.8),
                             squeeze=False, gridspec_kw={"height_ratios": [aspect, first.shape[1] / first.shape[2]][:rows]})
    for col, (name, vol) in enumerate(volumes.items()):
        vol = np.asarray(vol, np.float32)
        m = orthogonal_mips(vol, sp)
        finite = m[np.isfinite(m)]
        lo, hi = np.percentile(finite, percentiles) if finite.size else (0, 1)
        panels = [(axes[0][col], m, lambda v: orthogonal_mips(v.astype(np.float32), sp))]
        if mid_slice:
            z = vol.shape[0] // 2
            panels.append((axes[1][col], vol[z], lambda v, z=z: np.asarray(v[z], np.float32)))
        for row, (ax, img, project) in enumerate(panels):
            im = ax.imshow(np.clip(img, lo, hi), cmap="gray", interpolation="nearest", vmin=lo, vmax=hi)
            if name in overlays:
                lab = np.nan_to_num(project(overlays[name])).astype(np.int64)
                edge = np.ma.masked_where(~find_boundaries(lab, mode="inner"), np.ones_like(lab))
                ax.imshow(edge, cmap="autumn", alpha=0.9, interpolation="nearest")
            if name in outlines:
                mask = np.nan_to_num(project(np.asarray(outlines[name]) > 0)) > 0.5
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors="#00e5ff", linewidths=0.8)
            _scale_bar(ax, sp[2] if spacing is not None else None, img.shape[1] if row else vol.shape[2],
                       img.shape[0])
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if row == 0:
                ax.set_title(name, fontsize=10)
        unit = units.get(name, "") if isinstance(units, Mapping) else (units or "")
        cb = fig.colorbar(im, ax=[p[0] for p in panels], fraction=0.046, pad=0.02)
        cb.set_label(unit or "intensity", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    if mid_slice:
        axes[1][0].set_ylabel(f"z-slice {first.shape[0] // 2} of {first.shape[0]}", fontsize=9)
    axes[0][0].set_ylabel("max-projections: YX | ZY (right) | ZX (below)", fontsize=8)
    if outlines:
        fig.legend([Line2D([0], [0], color="#00e5ff", lw=1.2)], [outline_label or "outline"], loc="lower center",
                   ncol=1, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_bar_plot(path: str, groups: Mapping[str, Mapping[str, float | Sequence[float]]], ylabel: str = "",
                  title: str = "", colours: Mapping[str, str] | None = None) -> str:
    """Grouped bars, each showing ``n`` (and mean +- sd when it is given several values).

    Args:
        path: the PNG to write (atomically).
        groups: x-axis group (e.g. a metric) -> series name (e.g. a model) -> one value or the values
            of its ``n`` items (volumes, nuclei, images), drawn as their mean with the standard deviation.
        ylabel, title: axis label and title.
        colours: series name -> matplotlib colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(k for g in groups.values() for k in g))
    colours = dict(colours or {})
    fig, ax = plt.subplots(figsize=(1.2 + 1.4 * len(groups) * max(1, len(series)) / 2, 3.6))
    w = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for j, name in enumerate(series):
        for i, g in enumerate(groups.values()):
            if name not in g:
                continue
            vals = np.atleast_1d(np.asarray(g[name], dtype=np.float64))
            vals = vals[np.isfinite(vals)]
            mean = float(vals.mean()) if vals.size else np.nan
            err = float(vals.std(ddof=1)) if vals.size > 1 else None
            ax.bar(x[i] + j * w, mean, w, yerr=err, capsize=3, color=colours.get(name, f"C{j}"),
                   label=name if i == 0 else None)
            ax.annotate(f"n={vals.size}", (x[i] + j * w, mean), xytext=(0, 3 if mean >= 0 else -10),
                        textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(x + w * (len(series) - 1) / 2, list(groups))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, path)


def mean_sd(values, fmt: str = ".3f") -> str:
    """``"mean ± sd"`` of ``values`` (sample sd, ddof 1), or just the value when there is one.

    Args:
        values: numbers (e.g. one metric over seeds).
        fmt: format of both numbers.
    """
    v = np.asarray(list(values), float)
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if v.size > 1 else f"{v.mean():{fmt}}"


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


def git_commit(path: str) -> str:
    """The commit checked out at ``path`` (``git rev-parse HEAD``), for a report's provenance; a sentence saying
    so when ``path`` is not a git checkout or git is missing."""
    import subprocess

    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


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


def write_text(path: str, text: str) -> str:
    """Write a text file (a Markdown report) atomically: a killed run never leaves half of it."""
    from common.outputs import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path
