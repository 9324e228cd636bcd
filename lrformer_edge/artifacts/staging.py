"""File helpers without heavy dependencies (no torch): hashing, atomic writes, and the checks
that keep an output path from destroying anything that is not ours."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from lrformer_edge.files import (
    absolute_path,
    check_can_create_in,
    default_file_mode,
)

# Written into every folder staged_directory creates: only such a folder (or an empty one) is
# ever replaced, so a mistyped --output cannot delete a user's files.
ARTIFACT_MARKER = ".lrformer-edge-artifact"
# Finder leaves this in any folder it shows (packages included); losing it loses nothing.
DISPOSABLE_FILES = {".DS_Store"}
_SHOW = 3


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, suffix: str = ""):
    """Yield an empty sibling folder to fill; on success it replaces ``target`` (the previous
    one is removed only afterwards), on any error it is deleted: never a half-written folder.
    ``suffix`` ends the staging folder's name (tools that insist on ``.mlpackage``).

    Only an empty folder or a previous artifact (see ``check_replaceable_folder``) is replaced;
    anything else raises ValueError, before the work and again before the swap."""
    import shutil

    check_replaceable_folder(target, "output folder")
    target = absolute_path(target)
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


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that files are written into (reports, work folders): a folder or nothing yet."""
    given, path = Path(path), absolute_path(path)
    check_can_create_in(path, what, given)
    return given


def check_replaceable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that an export replaces whole: it must not exist yet, be empty, or be a previous
    artifact of ours (``ARTIFACT_MARKER``, or an OpenVINO IR / Core ML package carrying our
    metadata from before the marker); never the current folder or one that contains it."""
    given, path = Path(path), absolute_path(path)
    if path.is_symlink():
        raise ValueError(f"{what} {given} is a symbolic link; name the folder itself")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise ValueError(f"{what} {given} is the current folder or contains it; an export "
                         f"replaces its output folder, so choose a new or empty folder")
    if not path.exists():
        check_can_create_in(path.parent, what, given)
        return given
    if not path.is_dir():
        raise ValueError(f"{what} {given} is an existing file, not a folder; refusing to replace "
                         f"it: choose a new or empty folder")
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:_SHOW]) + (", ..." if len(foreign) > _SHOW else "")
        raise ValueError(f"{what} {given} holds files that are not an lrformer-edge artifact "
                         f"({shown}); refusing to replace it: choose a new or empty folder")
    check_can_create_in(path.parent, what, given)
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
