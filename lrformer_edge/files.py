"""Low-level file helpers every layer uses: SHA-256 of a file, atomic writes (temp file, then
rename), output-path checks that run before any work starts."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# The names a PyTorch checkpoint may have: what models.checkpoint reads and the pytorch backend
# runs. Here, below both, because the registry must load without PyTorch.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


CACHE_ENV = "LRFORMER_EDGE_CACHE"


def cache_dir() -> Path:
    """Where reusable intermediate results live (calibration statistics, generated calibration
    scenes): ``$LRFORMER_EDGE_CACHE``, else ``~/.cache/lrformer-edge``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lrformer-edge")


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
    path = check_output_file(path)
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


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """A file to create or overwrite: not a folder, and inside a folder we may write in."""
    given, path = Path(path), absolute_path(path)
    if path.is_dir():
        raise ValueError(f"{what} {given} is an existing folder, not a file: choose another name")
    check_can_create_in(path.parent, what, given)
    return given


def absolute_path(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path))  # "." and ".." made real; symbolic links kept as such


def check_can_create_in(folder: Path, what: str, given: Path) -> None:
    """``folder`` (or, where it does not exist yet, its nearest existing parent) must be a
    folder this process may create files in."""
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise ValueError(f"{what} {given}: {existing} is not a folder (a file is in the way)")
    # os.access: root may write anywhere except on a read-only file system, which it reports
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {given}: cannot write in {existing} (no permission or a "
                         f"read-only file system); choose another location")


