"""What keeps the MONAI Label server inside its studies folder: checked ids, tags and upload names, a
datastore whose every path stays inside the studies folder (symbolic links resolved), and the bind-address
rule (loopback only unless the operator opts in).

MONAI Label 0.8.5's ``LocalDatastore`` joins client-given image ids and label tags onto the studies folder
unchecked (``tag=../../x`` writes outside it); :class:`SafeLocalDatastore` wraps it rather than patching the
installed package.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)

# image ids: file names without their extension; label tags: folder names under labels/
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,199}")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = ("1-200 characters: letters, digits, '_', '-', '.', spaces; starting with a letter or digit; "
           "no '..', no path separators")
TAG_RULE = "1-64 characters: letters, digits, '_', '-', '.'; starting with a letter or digit; no '..'"


class RequestRejected(MONAILabelException):
    """A client request the app refuses; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, status: int, msg: str):
        super().__init__(MONAILabelError.INVALID_INPUT, msg)
        object.__setattr__(self, "status", status)

    def __str__(self) -> str:
        return self.msg


def _name_ok(value: str, pattern: re.Pattern) -> bool:
    return (isinstance(value, str) and pattern.fullmatch(value) is not None and ".." not in value
            and not value.endswith((".", " ")))


def check_id(value: str, what: str = "image id") -> str:
    """``value`` if it is a safe image id, else :class:`RequestRejected` (400) naming the rule."""
    if not _name_ok(value, ID_RE):
        raise RequestRejected(400, f"{what} {value!r} refused: {ID_RULE}")
    return value


def check_tag(value: str, what: str = "label tag") -> str:
    """``value`` if it is a safe label tag (a folder name under ``labels/``), else :class:`RequestRejected` (400)."""
    if not _name_ok(value, TAG_RE):
        raise RequestRejected(400, f"{what} {value!r} refused: {TAG_RULE}")
    return value


def split_extension(name: str, extensions) -> tuple[str, str]:
    """``(stem, extension)`` of a file name, the extension being the longest datastore pattern it ends with
    (case-insensitive, returned in lower case); :class:`RequestRejected` (400) when none matches."""
    low = name.lower()
    exts = sorted((e.replace("*", "").lower() for e in extensions), key=len, reverse=True)
    for e in exts:
        if e and low.endswith(e) and len(name) > len(e):
            return name[: -len(e)], e
    raise RequestRejected(400, f"file {name!r}: unsupported file type; accepted: {', '.join(reversed(exts))}")


def check_upload_name(filename: str | None, extensions, what: str = "upload") -> tuple[str, str]:
    """``(stem, extension)`` of an uploaded file's name: a bare name (no folders, no '..') with a safe stem and
    a datastore extension; :class:`RequestRejected` (400) otherwise."""
    if not filename:
        raise RequestRejected(400, f"{what}: the file part has no file name; send it as e.g. label=@cells.ome.tif")
    if "/" in filename or "\\" in filename or ".." in filename or os.path.isabs(filename):
        raise RequestRejected(400, f"{what} file name {filename!r} refused: a bare file name is expected "
                                   "(no folders, no '..')")
    stem, ext = split_extension(filename, extensions)
    check_id(stem, f"{what} file name stem")
    return stem, ext


def inside(root: str, path: str) -> bool:
    """Whether ``path``, symbolic links resolved, is ``root`` or below it (``root`` itself resolved too)."""
    root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def copy_atomic(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest`` through a temporary file in ``dest``'s folder and a rename (a symbolic link at
    ``dest`` is replaced, not followed; a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=os.path.dirname(dest))
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SafeLocalDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` with checked ids and tags and every path kept inside the studies folder.

    * image ids and label tags must pass :func:`check_id` / :func:`check_tag` (400 otherwise);
    * files (or ``labels/<tag>`` folders) that are symbolic links leading outside the studies folder are not
      listed, and a path that resolves outside it is refused (403), also when a link appears later;
    * entries of ``datastore_v2.json`` with unsafe ids or tags (e.g. written by an older server) are dropped;
    * images and labels are written through a temporary file and a rename, never through a symbolic link.
    """

    def __init__(self, datastore_path: str, **kwargs):
        self._root = os.path.realpath(datastore_path)
        self._warned: set[str] = set()
        super().__init__(self._root, **kwargs)

    # ------------------------------------------------------------------ containment
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg)

    def _contained(self, path: str, what: str) -> str:
        if not inside(self._root, path):
            raise RequestRejected(403, f"{what} resolves to {os.path.realpath(path)}, outside the studies folder "
                                       f"{self._root} (a symbolic link?); refused")
        return os.path.realpath(path)

    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        kept = {}
        for k, v in files.items():
            full = os.path.join(path, v)
            if not _name_ok(self._to_id(v)[0], ID_RE):
                self._warn_once(full, f"datastore: ignoring {full}: its name is not a valid image id ({ID_RULE}); "
                                      "rename it")
            elif inside(self._root, full):
                kept[k] = v
            else:
                self._warn_once(full, f"datastore: ignoring {full}: it leads outside the studies folder "
                                      f"({os.path.realpath(full)})")
        return kept

    def _remove_non_existing(self) -> int:
        invalidate = super()._remove_non_existing()
        images = self._datastore.image_path()
        for image_id in list(self._datastore.objects):
            obj = self._datastore.objects[image_id]
            image_file = os.path.join(images, self._filename(image_id, obj.image.ext))
            if not _name_ok(image_id, ID_RE) or not inside(self._root, image_file):
                self._warn_once(image_id, f"datastore: dropping image {image_id!r}: unsafe id or outside the studies "
                                          f"folder (rename the file: {ID_RULE})")
                del self._datastore.objects[image_id]
                invalidate += 1
                continue
            for tag in list(obj.labels):
                label_file = os.path.join(self._datastore.label_path(tag), self._filename(image_id, obj.labels[tag].ext))
                if not _name_ok(tag, TAG_RE) or not inside(self._root, label_file):
                    self._warn_once(f"{image_id}/{tag}", f"datastore: dropping label {tag!r} of {image_id!r}: unsafe "
                                                         "tag or outside the studies folder")
                    del obj.labels[tag]
                    invalidate += 1
        return invalidate

    # ------------------------------------------------------------------ reads
    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        uri = super().get_image_uri(image_id)
        return self._contained(uri, f"image {image_id!r}") if uri else uri

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        check_id(label_id, "label id")
        check_tag(label_tag)
        uri = super().get_label_uri(label_id, label_tag)
        return self._contained(uri, f"label {label_tag}/{label_id!r}") if uri else uri

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        check_id(image_id)
        info = super().get_image_info(image_id)
        if info.get("path"):
            self._contained(info["path"], f"image {image_id!r}")
        return info

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        check_id(label_id, "label id")
        check_tag(label_tag)
        return super().get_label_info(label_id, label_tag)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        check_tag(tag)
        return super().get_label_by_image_id(image_id, tag)

    def datalist(self, full_path=True):
        return [d for d in super().datalist(full_path)
                if not full_path or all(inside(self._root, p) for p in d.values())]

    # ------------------------------------------------------------------ writes
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        stem, ext = split_extension(os.path.basename(image_filename), self._extensions)
        image_id = check_id(image_id or stem)
        name = self._filename(image_id, ext)
        folder = self._contained(self._datastore.image_path(), "the images folder")
        dest = os.path.join(folder, name)
        if os.path.islink(dest) or (os.path.exists(dest) and not inside(self._root, dest)):
            raise RequestRejected(403, f"image {image_id!r}: {dest} is a symbolic link; refusing to write through it")
        logger.info(f"Adding Image: {image_id} => {dest}")
        with FileLock(self._lock_file):
            copy_atomic(image_filename, dest)
            info = dict(image_info or {})
            info.update({"ts": int(time.time()), "name": name})
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id)
        check_tag(label_tag)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise RequestRejected(404, f"image {image_id!r} is not in the datastore")
        _, ext = split_extension(os.path.basename(label_filename), self._extensions)
        folder = self._datastore.label_path(label_tag)
        if os.path.lexists(folder):
            self._contained(folder, f"label folder labels/{label_tag}")
        self._contained(os.path.dirname(folder), "the labels folder")
        name = self._filename(image_id, ext)
        dest = os.path.join(folder, name)
        if os.path.islink(dest):
            raise RequestRejected(403, f"label {label_tag}/{name}: {dest} is a symbolic link; refusing to write "
                                       "through it")
        logger.info(f"Saving label: {image_id} => {label_tag} => {dest}")
        with FileLock(self._lock_file):
            os.makedirs(folder, exist_ok=True)
            self._contained(folder, f"label folder labels/{label_tag}")
            # the same image may have had a label of another extension under this tag
            old = obj.labels.get(label_tag)
            copy_atomic(label_filename, dest)
            if old is not None and old.ext != ext:
                stale = os.path.join(folder, self._filename(image_id, old.ext))
                if os.path.isfile(stale) and not os.path.islink(stale):
                    os.remove(stale)
            info = dict(label_info or {})
            info.update({"ts": int(time.time()), "name": name})
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        check_id(image_id)
        if image_id in self._datastore.objects:
            self.get_image_uri(image_id)  # refuses one that leads outside
        return super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id, "label id")
        check_tag(label_tag)
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        check_id(image_id)
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        check_id(label_id, "label id")
        check_tag(label_tag)
        return super().update_label_info(label_id, label_tag, info)


# ---------------------------------------------------------------------------------------- bind address
def server_host(argv: list[str], main_module: str = "") -> tuple[str | None, int | None]:
    """``(host, port)`` this process was told to bind: by ``monailabel start_server`` (defaults ``0.0.0.0`` and
    8000) or by the ``uvicorn`` command (defaults ``127.0.0.1`` and 8000); ``(None, None)`` when it is neither
    (e.g. a training job, or a server started from Python: then only the per-request client check applies)."""
    import argparse

    if "start_server" in argv:
        args, defaults = argv[argv.index("start_server") + 1:], ("0.0.0.0", 8000)
    elif main_module.split(".")[0] == "uvicorn" or (argv and os.path.basename(argv[0]) == "uvicorn"):
        args, defaults = argv[1:], ("127.0.0.1", 8000)
    else:
        return None, None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-i", "--host", default=defaults[0])
    p.add_argument("-p", "--port", default=defaults[1], type=int)
    parsed, _ = p.parse_known_args(args)
    return parsed.host, parsed.port


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or a name) means this machine only."""
    if not host:
        return False
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def as_bool(value, name: str) -> bool:
    """A ``--conf`` yes/no value."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"--conf {name}: expected true or false, got {value!r}")


NO_AUTH_WARNING = ("the server is bound to {host} and has NO authentication: anyone who can reach port {port} can "
                   "read and overwrite the images and labels in {studies}, run inference and start training. "
                   "Allow it only on a trusted network (or put an authenticating reverse proxy in front).")


def check_bind(host: str | None, allow_remote: bool, port, studies: str) -> None:
    """Refuse (an app-init error, before the socket is bound) a non-loopback ``host`` unless ``allow_remote``;
    with it, log the no-authentication warning."""
    if host is None or is_loopback(host):
        return
    if not allow_remote:
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR,
            f"refusing to listen on {host!r}: this server has no authentication. Bind it to this machine "
            "(--host 127.0.0.1), or, on a trusted network only, opt in with --conf allow_remote true")
    logger.warning("zoo: " + NO_AUTH_WARNING.format(host=host, port=port, studies=studies))
