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
- ``preload``: ``true`` to load the networks at start (MONAI Label's own option);
- ``allow_remote``: ``true`` to let the server listen on a non-loopback address (``--host 0.0.0.0``, a LAN
  address) and answer clients other than this machine. Without it the app refuses to start on such an address:
  the server has no authentication (MONAI Label's own needs a Keycloak server), so anyone who reaches the port
  could read and write the studies folder and start jobs. With it, a warning saying so is logged;
- ``infer_concurrency``: inferences run at the same time (default 1; others wait their turn);
- ``reuse_memory``: ``true`` (default, as in the bundles' configs) keeps freed tensors' memory in the server
  process for the next inference (``common.fastpath.reuse_freed_memory``: no page faults on every pass;
  up to 1 GiB of free memory stays with the process); ``false`` keeps glibc's defaults.

Requests are checked before MONAI Label handles them (``lib/server.py``, ``lib/safety.py``): image ids, label
tags and upload names are plain names, every datastore path stays inside the studies folder (symbolic links
resolved), labels are validated against their image and target bundle when saved, an image a model cannot
take is refused before its network runs, and every error is JSON ``{"detail": ...}`` with a 4xx/5xx status.

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

# `lib` is this app's package: MONAI Label puts the app folder on sys.path while it loads main.py (and on
# PYTHONPATH for its workers); `common` comes from the installed project (`pip install -e .`, scripts/setup.sh)
APP_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(APP_DIR)

from lib.safety import (  # noqa: E402
    RequestRejected,
    SafeLocalDatastore,
    as_bool,
    check_bind,
    check_id,
    check_tag,
    server_host,
)
from lib.server import TRAIN_ERROR_MARK, TRAIN_OPTIONS, install, train_error_file  # noqa: E402
from lib.zoo import (  # noqa: E402
    DATASTORE_EXTENSIONS,
    ZooInferTask,
    ZooTrainTask,
    bundle_kind,
    choose_trainers,
    describe_label,
    find_bundles,
    label_problem,
    label_spec,
    parse_overrides,
    read_metadata,
    select,
)
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402

logger = logging.getLogger(__name__)


def _in_training_job() -> bool:
    """Whether this process is a training job MONAI Label started (``python -m monailabel.interfaces.utils.app``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monailabel.interfaces.utils.app"


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
        self.allow_remote = as_bool(conf.get("allow_remote", "false"), "allow_remote")
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        host, port = server_host(sys.argv, getattr(main_spec, "name", "") or "")
        check_bind(host, self.allow_remote, port, studies)  # before anything is loaded or bound
        self.infer_concurrency = max(1, int(conf.get("infer_concurrency", 1)))
        self.reuse_memory = as_bool(conf.get("reuse_memory", "true"), "reuse_memory")
        self.extensions = conf.get("extensions", ",".join(DATASTORE_EXTENSIONS)).split(",")
        self._trusted_inputs: set[str] = set()
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
        return SafeLocalDatastore(self.studies, extensions=self.extensions,
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
        try:  # the `common` the bundles' configs import (this repository's or a vendored copy)
            import common.fastpath as fastpath
        except ImportError:
            fastpath = None
        reuse = getattr(fastpath, "reuse_freed_memory", None)  # absent from a pre-0.3.4 vendored copy
        if reuse is not None and infers:
            logger.info(f"zoo: reuse_memory {reuse(self.reuse_memory)}")
        return infers

    def init_trainers(self):
        trainers = {}
        for n in self.trained:
            if n not in self._infers:  # not served (no weights): no train task either
                logger.warning(f"zoo: {n} is not served; no train task")
                continue
            if not os.path.isfile(os.path.join(self.bundles[n], "configs", "train.json")):
                logger.warning(f"zoo: {n} has no configs/train.json; no train task")
                continue
            task = ZooTrainTask(self.bundles[n], self.conf, self.train_overrides.get(n))
            if task.is_valid():
                trainers[n] = task
        return trainers

    # ------------------------------------------------------------------ serving (see lib/server.py)
    def on_init_complete(self):
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")
        if server is None or not hasattr(server, "app"):
            logger.warning("zoo: not MONAI Label's own FastAPI app (--uvicorn_app?): request checks not installed")
            return
        install(server.app, self)

    def served_infers(self) -> list[str]:
        return sorted(self._infers)

    def served_trainers(self) -> list[str]:
        return sorted(self._trainers)

    def trust_input(self, path: str) -> str:
        """Let :meth:`infer` read ``path`` (a file the server itself received) for the duration of a request."""
        self._trusted_inputs.add(path)
        return path

    def untrust_input(self, path) -> None:
        self._trusted_inputs.discard(path)

    def infer(self, request, datastore=None):
        """MONAI Label's infer on a datastore image (by id; resolved here, inside the studies folder) or on a file
        the server received for this request; never on another path of this machine."""
        image = request.get("image")
        if not (isinstance(image, str) and image in self._trusted_inputs):
            if not isinstance(image, str):
                raise RequestRejected(400, "image: a datastore image id is expected")
            check_id(image)
            ds = datastore or self.datastore()
            path = ds.get_image_uri(image) if image in ds.list_images() else ""
            if not path:
                raise RequestRejected(404, f"image {image!r} is not in the datastore (GET /datastore/?output=all)")
            request = dict(request, image=path)
        return super().infer(request, datastore)

    def check_image_file(self, path: str, name: str) -> None:
        """A :class:`RequestRejected` (422) when ``path`` is not a readable 2D or 3D image."""
        from common.io import ImageDimensionError, ImageReadError, read_image

        problem = None
        for dims in (3, 2):
            try:
                read_image(path, spatial_dims=dims, check_finite=False)
                return
            except ImageDimensionError as e:
                problem = e.problem
            except ImageReadError as e:
                raise RequestRejected(422, f"image upload {name}: {e.problem}") from e
        raise RequestRejected(422, f"image upload {name}: {problem}")

    def _label_specs(self, target: str | None) -> list[dict]:
        if target:
            if target not in self._infers:
                raise RequestRejected(404, f"model={target!r}: not served; served: {self.served_infers()}")
            task = self._trainers.get(target)
            return [task.label_spec if task else label_spec(target, self.bundles[target], self.kinds[target])]
        if self._trainers:
            return [t.label_spec for _, t in sorted(self._trainers.items())]
        return [label_spec(n, self.bundles[n], self.kinds[n]) for n in self.served_infers()]

    def check_label(self, image_id: str, image_path: str, label_path: str, name: str, target: str | None) -> None:
        """A :class:`RequestRejected` (422) naming the problem when the label cannot train ``target`` (or, without
        one, any of the served train tasks): see :func:`lib.zoo.label_problem`."""
        specs = self._label_specs(target)
        if not specs:
            return
        problems = []
        for spec in specs:
            problem = label_problem(label_path, image_path, spec, label_name=name)
            if problem is None:
                return
            problems.append((spec, problem))
        if len({p for _, p in problems}) == 1:  # the same problem for every target (unreadable, off the grid)
            spec, problem = problems[0]
            if len(problems) > 1:
                raise RequestRejected(422, problem)
            raise RequestRejected(422, f"{problem}; expected: {describe_label(spec)}")
        raise RequestRejected(422, f"label {name} for {image_id!r} fits none of the trained bundles: " + "; ".join(
            f"[{spec['bundle']}] {problem}" for spec, problem in problems) + " (name the target with model=<bundle>)")

    def check_train_request(self, model: str, params: dict) -> None:
        """Before a training job starts: a served train task, known options, a safe label tag and usable labels
        (the task's own checks, run here so that the client gets the reason at once, with a 4xx)."""
        if model not in self._trainers:
            raise RequestRejected(404, f"no train task {model!r}; served: {self.served_trainers()}")
        unknown = sorted(set(params) - TRAIN_OPTIONS)
        if unknown:
            raise RequestRejected(400, f"train option(s) {unknown} not accepted; accepted: {sorted(TRAIN_OPTIONS)}")
        def bad(key, want):
            raise RequestRejected(400, f"train option {key}={params[key]!r}: {want} expected")

        if "max_epochs" in params and not (type(params["max_epochs"]) is int and params["max_epochs"] >= 1):
            bad("max_epochs", "an integer >= 1")
        if "val_split" in params and not (type(params["val_split"]) in (int, float) and -1 <= params["val_split"] < 1):
            bad("val_split", "a number in [0, 1) (or -1)")
        for key in ("pretrained", "multi_gpu"):
            if key in params and type(params[key]) is not bool:
                bad(key, "true or false")
        for key in ("device", "gpus", "label_tag"):
            if key in params and not isinstance(params[key], str):
                bad(key, "a string")
        tag = check_tag(str(params.get("label_tag") or "final"))
        try:
            self._trainers[model]._fetch_datalist({"label_tag": tag}, self.datastore())
        except RequestRejected:
            raise
        except MONAILabelException as e:
            raise RequestRejected(422, e.msg) from e

    def train(self, request):
        """MONAI Label's train; in a training job, a failure leaves its message for ``GET /train/`` (a file and a
        marked last line) and ends the process at once."""
        try:
            return super().train(request)
        except Exception as e:
            if not _in_training_job():
                raise
            msg = e.msg if isinstance(e, MONAILabelException) else f"{type(e).__name__}: {e}"
            root = e
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            if root is not e:
                msg += f" (caused by {type(root).__name__}: {root})"
            logger.exception(f"training failed: {msg}")
            path = train_error_file(self.app_dir, request.get("zoo_job"))
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    f.write(msg)
                os.replace(path + ".tmp", path)
            print(f"{TRAIN_ERROR_MARK}{msg}", flush=True)
            sys.stderr.flush()
            os._exit(1)
