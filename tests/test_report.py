"""Report figures: scale and colour bars, outlines, mid z-slice; bar plots that show n."""

import numpy as np
import pytest
from PIL import Image

from common.report import _nice_length, git_commit, save_bar_plot, save_mip_figure


def test_nice_scale_bar_lengths():
    assert [_nice_length(e) for e in (27.8, 100, 9.6, 0.9)] == [5.0, 20.0, 1.0, 0.1]


@pytest.mark.parametrize("spacing", [(0.29, 0.29, 0.29), (2.0, 0.5, 0.5), None])
def test_mip_figure_with_outline_and_mid_slice(tmp_path, spacing):
    z, y, x = np.mgrid[:16, :48, :64]
    blob = np.exp(-((z - 8) ** 2 / 20 + (y - 24) ** 2 / 60 + (x - 30) ** 2 / 80)).astype(np.float32)
    path = save_mip_figure(str(tmp_path / "p.png"), {"target": blob, "prediction": blob * 0.9},
                           spacing=spacing, units={"target": "z-score"}, outlines={"target": blob > 0.5},
                           outline_label="prediction > Otsu", title="t")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[0] > 300 and img.shape[1] > 500
    cyan = (img[..., 0] < 80) & (img[..., 1] > 180) & (img[..., 2] > 200)
    assert cyan.sum() > 50  # the outline is drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]  # written atomically, nothing left over


def test_bar_plot_shows_n(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = []
    orig = plt.Axes.annotate

    def spy(self, text, *a, **k):
        texts.append(text)
        return orig(self, text, *a, **k)

    plt.Axes.annotate = spy
    try:
        save_bar_plot(str(tmp_path / "b.png"), {"whole": {"A": 0.5, "B": 0.1}, "per nucleus": {"A": [0.4, 0.6, 0.5]}})
    finally:
        plt.Axes.annotate = orig
    assert texts == ["n=1", "n=3", "n=1"]
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_git_commit_names_a_checkout_and_says_when_there_is_none(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path / "r")], check=True)
    assert git_commit(str(tmp_path / "r")).startswith("unknown")  # no commit yet
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "-C", str(tmp_path / "r"), "commit", "-q", "--allow-empty", "-m", "x"], check=True, env=env)
    sha = subprocess.run(["git", "-C", str(tmp_path / "r"), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert git_commit(str(tmp_path / "r")) == sha and len(sha) == 40
    assert git_commit(str(tmp_path / "missing")) == "unknown (not a git checkout)"
