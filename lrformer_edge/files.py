"""File helpers without heavy dependencies (no torch): hashing and atomic writes."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of an artifact: every file of a folder (OpenVINO IR folder, Core ML package), an
    OpenVINO ``.xml`` with its ``.bin``, or the one file."""
    path = Path(path)
    if path.is_dir():
        files = list(path.rglob("*"))
    else:
        files = [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else [])
    return sum(f.stat().st_size for f in files if f.is_file())


def default_file_mode() -> int:
    """What open() would give a new file (mkstemp's temporaries are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write, suffix: str = ".partial") -> Path:
    """Call ``write(tmp_path)``, then rename into place: never a half-written artifact.

    ``suffix`` ends the temporary name (writers that pick a format from the name, like OpenCV's
    VideoWriter, need the real one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, suffix: str = ""):
    """Yield an empty sibling folder to fill; on success it replaces ``target`` (the previous
    one is removed only afterwards), on any error it is deleted: never a half-written folder.
    ``suffix`` ends the staging folder's name (tools that insist on ``.mlpackage``)."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    staging.chmod(default_file_mode() | 0o111)  # mkdtemp makes 0700; a model folder is shared
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
