"""The zoo app's HTTP layer on top of MONAI Label's FastAPI server (``monailabel.app:app``), installed when the
app starts (:func:`install`), without patching the installed package:

* one ASGI middleware (:class:`ZooMiddleware`) in front of every route: loopback clients only (unless
  ``--conf allow_remote true``), ids and tags in query strings checked (400), endpoints the zoo does not need
  and that would widen the attack surface refused (model upload/delete, WSI inference, the DICOMweb proxy),
  and every error a JSON ``{"detail": ...}`` with a 4xx/5xx status instead of a bare text 500;
* the routes the zoo changes, served by a small FastAPI app of its own (:func:`zoo_api`): ``POST /infer/<model>``
  (served models only, datastore ids or an uploaded file, never a server path; one inference at a time by
  default), ``PUT /datastore/image`` and ``/datastore/label`` (checked names, labels validated against the image
  and the target bundle before they are stored), ``POST /train/<model>`` (checked options and labels before a
  job starts) and ``GET /train/`` (a failed job shows ``ERROR`` and its message as soon as its process ends).
"""

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Optional
from urllib.parse import parse_qsl

from fastapi import BackgroundTasks, Body, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.concurrency import run_in_threadpool

from .safety import RequestRejected, check_id, check_tag, check_upload_name, is_loopback

logger = logging.getLogger(__name__)

# query parameters that name a datastore object, and their check
QUERY_CHECKS = {"image": check_id, "id": check_id, "label": check_id, "tag": check_tag, "label_tag": check_tag}
# routes answered by zoo_api (method, path regex, after MONAI_LABEL_API_STR)
OWN_ROUTES = [
    ("POST", re.compile(r"/infer/[^/]+/?")),
    ("PUT", re.compile(r"/datastore/(image|label)?/?")),
    ("POST", re.compile(r"/train(/[^/]*)?/?")),
    ("GET", re.compile(r"/train/?")),
]
BLOCKED = [
    ({"PUT", "DELETE"}, re.compile(r"/model/.*"),
     "replacing or deleting weights over HTTP is disabled in this app; train (POST /train/<model>) or copy "
     "models/model.pt into the bundle folder"),
    (None, re.compile(r"/infer/wsi.*"), "whole-slide inference is not served by this app"),
    (None, re.compile(r"/proxy/.*"), "the DICOMweb proxy is not served by this app (its datastore is a local folder)"),
]
RESULT_EXTENSIONS = (".ome.tif", ".nii.gz", ".nii", ".png")
TRAIN_ERROR_MARK = "ZOO_TRAIN_ERROR: "
# train options a client may set (the rest of a bundle's training is its train.json and --conf train_overrides)
TRAIN_OPTIONS = {"max_epochs", "val_split", "label_tag", "device", "pretrained", "multi_gpu", "gpus"}



def error_status(e: BaseException) -> tuple[int, str]:
    """HTTP status and message for an exception raised while serving a request."""
    if isinstance(e, RequestRejected):
        return e.status, e.msg
    if isinstance(e, (ImageNotFoundException, LabelNotFoundException)):
        return 404, e.msg
    if isinstance(e, MONAILabelException):
        status = 400 if e.error == MONAILabelError.INVALID_INPUT else 500
        return status, e.msg
    if isinstance(e, TimeoutError):
        return 504, f"timed out ({e})"
    return 500, f"{type(e).__name__}: {e}"


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _api_path(scope) -> str:
    path = scope.get("path", "")
    prefix = settings.MONAI_LABEL_API_STR or ""
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


class ZooMiddleware:
    """ASGI middleware: the checks every request passes, the zoo's own routes, JSON errors (see the module doc)."""

    def __init__(self, app, zoo, api: FastAPI):
        self.app = app
        self.zoo = zoo
        self.api = api

    def check(self, scope) -> None:
        client = scope.get("client")
        if not self.zoo.allow_remote and client and not is_loopback(client[0]):
            raise RequestRejected(403, f"requests from {client[0]} are refused: this server serves this machine only "
                                       "(start it with --conf allow_remote true to serve a trusted network)")
        method, path = scope.get("method", ""), _api_path(scope)
        for methods, pattern, why in BLOCKED:
            if (methods is None or method in methods) and pattern.fullmatch(path):
                raise RequestRejected(403, f"{method} {path}: {why}")
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in QUERY_CHECKS and value:
                QUERY_CHECKS[key](value, f"query parameter {key}=")
        m = re.fullmatch(r"/batch/infer/([^/]+)/?", path)
        if method == "POST" and m and m.group(1) not in self.zoo.served_infers():
            raise RequestRejected(404, f"model {m.group(1)!r} is not served; served: {self.zoo.served_infers()}")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.check(scope)
        except RequestRejected as e:
            logger.warning(f"refused {scope.get('method')} {scope.get('path')}: {e.msg}")
            return await _send_json(send, e.status, {"detail": e.msg})
        method, path = scope.get("method", ""), _api_path(scope)
        inner = self.api if any(m == method and p.fullmatch(path) for m, p in OWN_ROUTES) else self.app
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await inner(scope, receive, send_tracked)
        except Exception as e:
            if started:
                raise
            status, msg = error_status(e)
            if status >= 500:
                logger.exception(f"{method} {path} failed")
            await _send_json(send, status, {"detail": msg})


def install(fastapi_app, zoo) -> None:
    """Put :class:`ZooMiddleware` (with :func:`zoo_api`) in front of MONAI Label's FastAPI app; the middleware
    stack is rebuilt at the next request (the app is already running its lifespan when the zoo app starts)."""
    from starlette.middleware import Middleware

    if any(getattr(m, "cls", None) is ZooMiddleware for m in fastapi_app.user_middleware):
        return
    fastapi_app.user_middleware.insert(0, Middleware(ZooMiddleware, zoo=zoo, api=zoo_api(zoo)))
    fastapi_app.middleware_stack = None
    logger.info("zoo: request checks installed (ids, tags, uploads, loopback clients, JSON errors)")


# ------------------------------------------------------------------------------------------ the zoo's routes
def _params(params: str | dict | None) -> dict:
    if isinstance(params, dict):
        return params
    try:
        p = json.loads(params) if params else {}
    except json.JSONDecodeError as e:
        raise RequestRejected(400, f"params: not JSON ({e})") from e
    if not isinstance(p, dict):
        raise RequestRejected(400, "params: a JSON object is expected")
    return p


def _save_upload(upload: UploadFile, extensions, what: str) -> tuple[str, str, str]:
    """Checked name -> ``(temporary folder, path of the copy inside it, stem)``."""
    stem, ext = check_upload_name(upload.filename, extensions, what)
    folder = tempfile.mkdtemp(prefix="zoo-upload-")
    path = os.path.join(folder, f"{stem}{ext}")
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return folder, path, stem


def zoo_api(zoo) -> FastAPI:
    """The FastAPI app serving the routes the zoo changes (see the module doc); ``zoo`` is the MONAI Label app."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    prefix = settings.MONAI_LABEL_API_STR or ""
    user_role = settings.MONAI_LABEL_AUTH_ROLE_USER
    annotator_role = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
    admin_role = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
    state: dict[str, Any] = {}

    @api.exception_handler(MONAILabelException)
    async def _monailabel_error(request, e):
        status, msg = error_status(e)
        return JSONResponse({"detail": msg}, status_code=status)

    @api.exception_handler(Exception)
    async def _server_error(request, e):  # a JSON 500 rather than Starlette's text one
        status, msg = error_status(e)
        return JSONResponse({"detail": msg}, status_code=status)

    def infer_slots() -> asyncio.Semaphore:
        if "infer" not in state:
            state["infer"] = asyncio.Semaphore(zoo.infer_concurrency)
        return state["infer"]

    @api.post(prefix + "/infer/{model}")
    async def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
                    params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
                    output: Optional[ResultType] = None, user: User = Depends(RBAC(user_role))):
        served = zoo.served_infers()
        if model not in served:
            raise RequestRejected(404, f"model {model!r} is not served by this server; served: {served} (GET /info/)")
        p = _params(params)
        for key in ("image", "model", "session", "label", "file", "save_label", "label_tag", "model_filename"):
            if key in p:
                raise RequestRejected(400, f"params may not set {key!r}" + (
                    "; save corrected labels with PUT /datastore/label" if key in ("save_label", "label_tag") else ""))
        if "result_extension" in p and p["result_extension"] not in RESULT_EXTENSIONS:
            raise RequestRejected(400, f"params result_extension={p['result_extension']!r}: one of "
                                       f"{list(RESULT_EXTENSIONS)} expected")
        if label:
            raise RequestRejected(400, "a label input is not used by the zoo's models")
        if output == ResultType.dicom_seg:
            raise RequestRejected(400, "output=dicom_seg needs a DICOMweb datastore; use output=image")
        request = dict(zoo.info().get("config", {}).get("infer", {}))
        request.update(p)
        request["model"] = model
        folder = None
        try:
            if file:
                folder, path, _ = _save_upload(file, zoo.extensions, "image upload")
                request["image"] = zoo.trust_input(path)
            elif session_id:
                session = zoo.sessions().get_session(session_id) if zoo.sessions() else None
                if not session:
                    raise RequestRejected(404, f"session {session_id!r} not found")
                request["image"] = zoo.trust_input(session.image)  # the server's own copy; stays trusted
            elif image:
                request["image"] = image  # checked against the datastore by the app's infer()
            else:
                raise RequestRejected(400, "no input: give image=<datastore id> or upload a file (file=@image.ome.tif)")
            async with infer_slots():
                result = await run_in_threadpool(zoo.infer, request)
        finally:  # the input is not needed once the result is written
            if folder:
                zoo.untrust_input(request.get("image"))
                shutil.rmtree(folder, ignore_errors=True)
        if result is None:
            raise RuntimeError("inference returned no result")
        return send_response(zoo.datastore(), result, output, background_tasks)

    @api.put(prefix + "/datastore/")
    @api.put(prefix + "/datastore/image")
    def add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                  user: User = Depends(RBAC(annotator_role))):
        info = _params(params)
        folder, path, stem = _save_upload(file, zoo.extensions, "image upload")
        try:
            image_id = check_id(image or stem)
            zoo.check_image_file(path, file.filename)
            if user.username:
                info["user"] = user.username
            return {"image": zoo.datastore().add_image(image_id, path, info)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @api.put(prefix + "/datastore/label")
    def save_label(image: str, tag: str = "final", model: str = "", params: str = Form("{}"),
                   label: UploadFile = File(...), user: User = Depends(RBAC(annotator_role))):
        check_id(image)
        check_tag(tag)
        info = _params(params)
        target = model or str(info.get("model") or "")
        image_path = zoo.datastore().get_image_uri(image)
        if not image_path:
            raise RequestRejected(404, f"image {image!r} is not in the datastore (GET /datastore/?output=all)")
        folder, path, _ = _save_upload(label, zoo.extensions, "label upload")
        try:
            zoo.check_label(image, image_path, path, label.filename, target or None)
            if user.username:
                info["user"] = user.username
            label_id = zoo.datastore().save_label(image, path, tag, info)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        res = zoo.on_save_label(image, label_id) or {}
        res.update({"image": image, "label": label_id})
        return res

    async def _start_training(model: str, params: dict | None, run_sync: bool, enqueue: bool):
        from monailabel.endpoints import train as train_endpoint

        params = dict(params or {})
        await run_in_threadpool(zoo.check_train_request, model, params)
        params["zoo_job"] = uuid.uuid4().hex  # where the job leaves its failure message (see task_view)
        if run_sync:
            return await run_in_threadpool(train_endpoint.run_model, model, params, True, enqueue)
        return train_endpoint.run_model(model, params, False, enqueue)

    @api.post(prefix + "/train/{model}")
    async def train_model(model: str, params: Optional[dict] = Body(None), run_sync: Optional[bool] = False,
                          enqueue: Optional[bool] = False, user: User = Depends(RBAC(admin_role))):
        return await _start_training(model, params, bool(run_sync), bool(enqueue))

    @api.post(prefix + "/train/")
    async def train_all(params: Optional[dict] = Body(None), run_sync: Optional[bool] = False,
                        user: User = Depends(RBAC(admin_role))):
        result = {}
        for model in zoo.served_trainers():
            per = dict((params or {}).get(model) or {})
            res = await _start_training(model, per, bool(run_sync), True)
            result[model] = {"result": res, "detail": None}
        return result

    @api.get(prefix + "/train/")
    def train_status(all: bool = False, check_if_running: bool = False, user: User = Depends(RBAC(user_role))):
        from monailabel.utils.async_tasks.task import AsyncTask

        refresh_train_tasks()
        res, detail = AsyncTask.status("train", all, check_if_running)
        if res is None:
            raise HTTPException(status_code=404, detail=detail)
        return [task_view(t, zoo.app_dir) for t in res] if isinstance(res, list) else task_view(res, zoo.app_dir)

    return api


def refresh_train_tasks() -> None:
    """Mark a training task whose process has ended DONE or ERROR now, rather than when MONAI Label's reader
    thread gets to it (it waits for the job's output pipe to close, which a leftover child process can delay)."""
    from datetime import datetime

    from monailabel.utils.async_tasks.utils import background_processes, background_tasks

    procs = background_processes.get("train", {})
    for task in background_tasks.get("train", []):
        proc = procs.get(task.get("id"))
        if task.get("status") == "RUNNING" and proc is not None and proc.poll() is not None:
            task["status"] = "DONE" if proc.returncode == 0 else "ERROR"
            task.setdefault("end_ts", datetime.today().strftime("%Y-%m-%d %H:%M:%S"))


def train_error_file(app_dir: str, job: str) -> str | None:
    """Where the training job ``job`` (a hex id the server gave it) leaves its failure message."""
    if not isinstance(job, str) or not re.fullmatch(r"[0-9a-f]{32}", job):
        return None
    return os.path.join(app_dir, "logs", f"train-{job}.error")


def task_view(task: dict, app_dir: str) -> dict:
    """A training task as JSON, with ``message``: the failure's message for a failed task (the one the job
    wrote, else its last output line)."""
    out = dict(task)
    details = [str(d) for d in (task.get("details") or [])]
    out["details"] = details
    if task.get("status") == "ERROR":
        path = train_error_file(app_dir, (task.get("request") or {}).get("zoo_job"))
        message = None
        if path and os.path.isfile(path):
            with open(path) as f:
                message = f.read().strip() or None
        if message is None:
            marked = [d.split(TRAIN_ERROR_MARK, 1)[1] for d in details if TRAIN_ERROR_MARK in d]
            lines = [d for d in details if d.strip()]
            message = marked[-1] if marked else (lines[-1] if lines else "the training process failed")
        out["message"] = message
    return out
