"""LRFormer Edge: LRFormer from a PyTorch checkpoint to verified INT8/FP16 edge artifacts."""
from lrformer_edge.models import create_model, model_config
from lrformer_edge.registry import get_config, list_models

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_config", "list_models", "model_config"]
