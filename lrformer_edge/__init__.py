"""LRFormer Edge: LRFormer from a PyTorch checkpoint to verified INT8/FP16 edge artifacts.

``create_model`` and ``model_config`` import PyTorch on first use only, so the runtime side
(runners, pre/postprocessing, metrics, validation against saved reference outputs) works on
devices that have no PyTorch.
"""
from lrformer_edge.registry import get_config, list_models

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_config", "list_models", "model_config"]


def __getattr__(name: str):
    if name in ("create_model", "model_config"):
        from lrformer_edge import models

        return getattr(models, name)
    raise AttributeError(f"module 'lrformer_edge' has no attribute {name!r}")
