"""Optional SDKs (OpenVINO, NNCF, coremltools, TensorRT...) are imported on first use; a missing
one raises an error naming the extra that installs it."""
from __future__ import annotations


class MissingDependencyError(ImportError):
    """An optional SDK is not installed; the message names the pip command."""


def require(module: str, extra: str, what: str):
    """Import an optional SDK lazily, or raise an error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs the Python package '{module.split('.')[0]}', which is not installed; "
            f"run: pip install 'lrformer-edge[{extra}]'") from None


