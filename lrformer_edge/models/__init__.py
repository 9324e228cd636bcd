"""LRFormer models: the reference implementation and its export-friendly form."""
from lrformer_edge.models.factory import create_model, model_config

__all__ = ["create_model", "model_config"]
