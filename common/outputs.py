"""Output folders and files: checked before any work, written atomically, leftovers cleaned up.

* :func:`prepare_output_dir` creates a folder, proves it is writable, checks the free space
  against what a run will write, and removes temporary files that a killed run left behind.
  Bundles call it in their ``initialize`` step, after the data were checked, so a bad folder is
  found in a second, not after the whole computation.
* :func:`atomic_write` writes through a temporary file in the destination folder and renames it
  over the final name (``os.replace`` is atomic on POSIX), so a kill at any moment leaves either
  the previous file or the complete new one under the final name, never a partial file.
  Temporary names carry the writer's process id: ``.tmp_<pid>_<random><suffix>``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from common.errors import OutputDirError

__all__ = ["OutputDirError", "atomic_write", "temp_path", "remove_stale_temp", "prepare_output_dir",
           "expected_output_bytes"]

TEMP_PREFIX = ".tmp_"
_TEMP = re.compile(r"^\.tmp_(\d+)_")
_log = logging.getLogger(__name__)


def temp_path(final_path: str | os.PathLike, suffix: str | None = None) -> str:
    """A new, empty temporary file beside ``final_path`` (same folder, so a rename is atomic)."""
    final_path = os.path.abspath(str(final_path))
    folder = os.path.dirname(final_path)
    os.makedirs(folder, exist_ok=True)
    if suffix is None:
        suffix = "".join(Path(final_path).suffixes[-2:]) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}_", suffix=suffix, dir=folder)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_write(final_path: str | os.PathLike, suffix: str | None = None, mode: int = 0o644):
    """Context manager yielding a temporary path; on success it is renamed to ``final_path``.

    On any exception (including ``KeyboardInterrupt``) the temporary file is removed and
    ``final_path`` is untouched. Example::

        with atomic_write("models/model.pt") as tmp:
            torch.save(state, tmp)
    """
    final_path = str(final_path)
    tmp = temp_path(final_path, suffix)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Remove ``.tmp_<pid>_*`` files whose writer process is gone (left by a killed run).

    Files of a process that is still running (another rank, a parallel run) are kept.
    Returns the removed paths.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for root, _, names in walker:
        for name in names:
            m = _TEMP.match(name)
            if m and not _pid_alive(int(m.group(1))):
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    os.remove(path)
                    removed.append(path)
    if removed:
        _log.info(f"removed {len(removed)} temporary file(s) left by an interrupted run in {folder}")
    return removed


def expected_output_bytes(paths: Iterable[str], n_outputs: int = 1, bytes_per_voxel: int = 4) -> int:
    """Upper bound of what writing ``n_outputs`` uncompressed arrays per input image takes."""
    from common.io import voxel_count

    return int(sum(voxel_count(p) for p in paths) * n_outputs * bytes_per_voxel)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def prepare_output_dir(path: str | os.PathLike, required_bytes: int = 0, records=None, key: str = "image",
                       n_outputs: int = 1, margin: float = 1.1) -> str:
    """Create ``path`` if needed, prove it is writable, check free space, clean up leftovers.

    Args:
        path: the output folder.
        required_bytes: bytes the run will write (at least); ``records`` adds an estimate.
        records: inference datalist (``[{key: image path}, ...]``): the expected output size is
            estimated from the images' shapes (``n_outputs`` float32 arrays per image).
        margin: free space must exceed ``margin * required``.

    Returns:
        ``path``.

    Raises:
        OutputDirError: the folder cannot be created or written, or has too little free space.
    """
    path = str(path)
    what = "to write the outputs, choose another folder with --output_dir (or free space)"
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{path}: output folder is an existing file; {what}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{path}: cannot create the output folder ({e.strerror or e}); {what}") from e
    remove_stale_temp(path)
    try:
        probe = temp_path(os.path.join(path, "write_test"), ".probe")
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(f"{path}: output folder is not writable ({e.strerror or e}); {what}") from e
    need = int(required_bytes)
    if records is not None:
        need += expected_output_bytes([r[key] for r in records], n_outputs=n_outputs)
    if need > 0:
        free = shutil.disk_usage(path).free
        if free < margin * need:
            raise OutputDirError(f"{path}: not enough free space: the outputs need up to {_gib(need)}, "
                                 f"{_gib(free)} free; {what}")
    return path
