"""File helpers without heavy dependencies (no torch): hashing, atomic writes, and the checks
that keep an output path from destroying anything that is not ours."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

# Written into every folder staged_directory creates: only such a folder (or an empty one) is
# ever replaced, so a mistyped --output cannot delete a user's files.
ARTIFACT_MARKER = ".lrformer-edge-artifact"
# Finder leaves this in any folder it shows (packages included); losing it loses nothing.
DISPOSABLE_FILES = {".DS_Store"}
_SHOW = 3


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


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, suffix: str = ""):
    """Yield an empty sibling folder to fill; on success it replaces ``target`` (the previous
    one is removed only afterwards), on any error it is deleted: never a half-written folder.
    ``suffix`` ends the staging folder's name (tools that insist on ``.mlpackage``).

    Only an empty folder or a previous artifact (see ``check_replaceable_folder``) is replaced;
    anything else raises ValueError, before the work and again before the swap."""
    import shutil

    check_replaceable_folder(target, "output folder")
    target = _absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    staging.chmod(default_file_mode() | 0o111)  # mkdtemp makes 0700; a model folder is shared
    try:
        yield staging
        _write_marker(staging)
        check_replaceable_folder(target, "output folder")  # it may have changed meanwhile
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


# ------------------------------------------------------------------ output-path checks
# Each raises ValueError with one line naming ``what`` (e.g. "--output") and the path; the
# command-line tools call them right after parsing (lrformer_edge.cli.check_output_argument),
# the writers call them again as the last guard.

def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """A file to create or overwrite: not a folder, and inside a folder we may write in."""
    given, path = Path(path), _absolute(path)
    if path.is_dir():
        raise ValueError(f"{what} {given} is an existing folder, not a file: choose another name")
    _check_can_create_in(path.parent, what, given)
    return given


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that files are written into (reports, work folders): a folder or nothing yet."""
    given, path = Path(path), _absolute(path)
    _check_can_create_in(path, what, given)
    return given


def check_replaceable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that an export replaces whole: it must not exist yet, be empty, or be a previous
    artifact of ours (``ARTIFACT_MARKER``, or an OpenVINO IR / Core ML package carrying our
    metadata from before the marker); never the current folder or one that contains it."""
    given, path = Path(path), _absolute(path)
    if path.is_symlink():
        raise ValueError(f"{what} {given} is a symbolic link; name the folder itself")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise ValueError(f"{what} {given} is the current folder or contains it; an export "
                         f"replaces its output folder, so choose a new or empty folder")
    if not path.exists():
        _check_can_create_in(path.parent, what, given)
        return given
    if not path.is_dir():
        raise ValueError(f"{what} {given} is an existing file, not a folder; refusing to replace "
                         f"it: choose a new or empty folder")
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:_SHOW]) + (", ..." if len(foreign) > _SHOW else "")
        raise ValueError(f"{what} {given} holds files that are not an lrformer-edge artifact "
                         f"({shown}); refusing to replace it: choose a new or empty folder")
    _check_can_create_in(path.parent, what, given)
    return given


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in ``folder`` that no lrformer-edge export wrote (relative paths, a few at most);
    empty when the folder is empty or a previous artifact that may be replaced."""
    folder = Path(folder)
    listed = _marker_files(folder)
    if listed is None:
        if _is_unmarked_artifact(folder):
            return []
        return sorted(set(os.listdir(folder)) - DISPOSABLE_FILES)[:_SHOW + 1]
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            ours = relative in listed or relative == ARTIFACT_MARKER
            if not ours and name not in DISPOSABLE_FILES:
                found.append(relative)
                if len(found) > _SHOW:
                    return sorted(found)
    return sorted(found)


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path))  # "." and ".." made real; symbolic links kept as such


def _check_can_create_in(folder: Path, what: str, given: Path) -> None:
    """``folder`` (or, where it does not exist yet, its nearest existing parent) must be a
    folder this process may create files in."""
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise ValueError(f"{what} {given}: {existing} is not a folder (a file is in the way)")
    # os.access: root may write anywhere except on a read-only file system, which it reports
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {given}: cannot write in {existing} (no permission or a "
                         f"read-only file system); choose another location")


def _write_marker(folder: Path) -> None:
    files = sorted((Path(root) / name).relative_to(folder).as_posix()
                   for root, _, names in os.walk(folder) for name in names)
    (folder / ARTIFACT_MARKER).write_text(json.dumps(
        {"written_by": "lrformer-edge", "files": files}, indent=1) + "\n")


def _marker_files(folder: Path) -> set[str] | None:
    """The files the marker of ``folder`` lists; None without a readable marker."""
    try:
        listed = json.loads((folder / ARTIFACT_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(listed) if isinstance(listed, list) else None


def _is_unmarked_artifact(folder: Path) -> bool:
    """An OpenVINO IR folder or Core ML package written before the marker existed: nothing but
    the files those exports write, with our metadata inside."""
    names = set(os.listdir(folder)) - DISPOSABLE_FILES
    if names and all(n.endswith((".xml", ".bin")) and (folder / n).is_file() for n in names):
        xmls = [folder / n for n in names if n.endswith(".xml")]
        return bool(xmls) and all(b"<lrformer_edge>" in x.read_bytes() for x in xmls)
    spec = folder / "Data" / "com.apple.CoreML" / "model.mlmodel"
    package = {"Manifest.json", "Data", "executorch_debug_handle_mapping.json"}
    return ({"Manifest.json", "Data"} <= names <= package and spec.is_file()
            and b"lrformer_edge." in spec.read_bytes())
