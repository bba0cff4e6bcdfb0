"""MONAI Label app serving the label-free microscopy zoo: every bundle as an infer task, the segmentation
bundles also as train tasks, images and labels kept in a local studies folder.

    monailabel start_server --app monailabel_app --studies my_images --host 127.0.0.1 --port 8000 \
        --conf models all

``--conf`` options (all optional):

- ``models``: ``all`` (default) or a comma-separated list of bundle names to serve;
- ``zoo_dir``: folder of bundle folders (default: this repository's ``bundles/``), e.g. one filled by
  ``python scripts/zoo.py download <name> --index ... --bundle_dir <folder>``;
- ``train_models``: ``segmentation`` (default: the segmentation bundles), ``all`` (virtual staining too:
  the datastore "label" is then the paired fluorescence image), ``none``, or a list;
- ``train_overrides``: JSON of bundle config overrides for every training run, for all bundles or per
  bundle, e.g. ``'{"epoch_length":50,"isl_nucleus_seg":{"batch_size":4}}'`` (no spaces: the
  ``monailabel`` launcher splits its arguments at spaces; ``python -m monailabel.main`` does not);
- ``extensions``: datastore file patterns (default ``*.nii,*.nii.gz,*.tif,*.tiff,*.ome.tif,*.ome.tiff,*.png``);
- ``preload``: ``true`` to load the networks at start (MONAI Label's own option).

Only local bundle folders are used; nothing is downloaded. A bundle is served once it has weights
(``models/model.pt`` or ``models/model.ts``); a bundle without weights is skipped with a log line.
Caveat: one server process imports one ``common`` package, this repository's when it is available,
otherwise the first served bundle's vendored copy; bundles packaged from different zoo releases should
be served by separate servers.
"""

from __future__ import annotations

import logging
import os
import sys

APP_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(APP_DIR)
if APP_DIR not in sys.path:
    sys.path.insert(0, APP_DIR)
try:  # the zoo's shared package: installed (pip install -e .) or this checkout
    import common  # noqa: F401
except ImportError:
    if os.path.isfile(os.path.join(REPO_ROOT, "common", "__init__.py")):
        sys.path.insert(0, REPO_ROOT)

from lib.zoo import (  # noqa: E402
    DATASTORE_EXTENSIONS,
    ZooInferTask,
    ZooTrainTask,
    bundle_kind,
    choose_trainers,
    find_bundles,
    parse_overrides,
    read_metadata,
    select,
)
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402

logger = logging.getLogger(__name__)


def _die_with_the_server():
    """MONAI Label runs a training job as a child process (``python -m monailabel.interfaces.utils.app -m
    train``) that would outlive a server stopped with ``kill``; on Linux, ask the kernel to stop it when its
    parent, the server, goes away."""
    main_mod = sys.modules.get("__main__")
    spec = getattr(main_mod, "__spec__", None)
    if getattr(spec, "name", "") != "monailabel.interfaces.utils.app" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the server had already gone
            os.kill(os.getpid(), signal.SIGTERM)
    except OSError:  # not glibc: the job then runs to its end
        pass


_die_with_the_server()


class LabelFreeZooApp(MONAILabelApp):
    """The zoo's bundles as MONAI Label infer (and, for segmentation, train) tasks."""

    def __init__(self, app_dir, studies, conf):
        conf = conf or {}
        self.zoo_dir = os.path.abspath(conf.get("zoo_dir") or os.path.join(REPO_ROOT, "bundles"))
        self.bundles = find_bundles(self.zoo_dir)
        names = list(self.bundles)
        self.served = select(conf.get("models", "all"), names, "models")
        self.kinds = {n: bundle_kind(n, read_metadata(self.bundles[n])) for n in self.served}
        self.trained = choose_trainers(self.served, self.kinds, names, conf.get("train_models"))
        self.train_overrides = parse_overrides(conf.get("train_overrides"), names)
        logger.info(f"zoo: {self.zoo_dir}; serving {self.served}; training {self.trained}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Label-free microscopy zoo",
                         description="Virtual staining and nucleus/cell segmentation bundles (MONAI bundles)",
                         version="0.1.0")

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return LocalDatastore(self.studies, extensions=self.conf.get("extensions", ",".join(DATASTORE_EXTENSIONS)).split(","),
                              auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                              read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        infers = {}
        for n in self.served:
            task = ZooInferTask(self.bundles[n], self.conf, self.kinds[n])
            if task.is_valid():
                infers[n] = task
            else:
                logger.warning(f"zoo: {n} not served: no usable configs/inference.json or no weights in "
                               f"{self.bundles[n]}/models (train it, or download the packaged bundle)")
        return infers

    def init_trainers(self):
        trainers = {}
        for n in self.trained:
            if not os.path.isfile(os.path.join(self.bundles[n], "configs", "train.json")):
                logger.warning(f"zoo: {n} has no configs/train.json; no train task")
                continue
            task = ZooTrainTask(self.bundles[n], self.conf, self.train_overrides.get(n))
            if task.is_valid():
                trainers[n] = task
        return trainers
