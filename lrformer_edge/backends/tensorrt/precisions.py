"""The layer-precision list of a Q/DQ ONNX made from a precision config, and its use in the
engine build.

A precision config's float layers get no Q/DQ in the ONNX (``qdq.quantize_qdq``), so a strongly
typed build (the default, and TensorRT 11's only mode) runs them in FP32, as the ONNX types them
and as ONNX Runtime checked them. The list lets a weakly typed build (TensorRT 10.x, e.g.
JetPack 6's trtexec) run them in FP16 instead: ``{ONNX node name: "fp16"}`` for the float layers,
plus ``"fp32"`` for the operators this toolkit keeps in FP32 everywhere (``qdq.FLOAT_TYPES``:
LayerNorm, Softmax, Resize; a weakly typed FP16 build would otherwise be free to run them in
FP16). TensorRT's ONNX parser names each node's layer after the node, so the list applies by
name: ``layer.precision`` with ``PREFER_PRECISION_CONSTRAINTS`` in ``engine.build_engine``, and
``--precisionConstraints=prefer --layerPrecisions=...`` with trtexec.
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from lrformer_edge.backends.tensorrt.qdq import FLOAT_TYPES

LAYER_PRECISIONS_KEY = "layer_precisions"  # in the ONNX metadata and the engine's sidecar
FLOAT_LAYER_PRECISION = "fp16"
PINNED_PRECISION = "fp32"
FIRST_STRONGLY_TYPED_ONLY = 11  # TensorRT major version without weakly typed networks
# trtexec's --layerPrecisions syntax: name:precision pairs separated by commas.
_TRTEXEC_SEPARATORS = (",", ":")


def layer_precisions(onnx_model, float_nodes: Iterable[str]) -> dict[str, str]:
    """The list for a Q/DQ ONNX whose ``float_nodes`` were kept out of quantization (empty
    without any: such an ONNX is built like a plain one, strongly typed)."""
    float_nodes = list(float_nodes)
    if not float_nodes:
        return {}
    precisions = {node.name: PINNED_PRECISION for node in onnx_model.graph.node
                  if node.op_type in FLOAT_TYPES}
    precisions.update((name, FLOAT_LAYER_PRECISION) for name in float_nodes)
    unusable = [name for name in precisions if not name
                or any(sep in name for sep in _TRTEXEC_SEPARATORS)]
    if unusable:
        raise ValueError(f"node names {unusable[:3]} cannot be given to TensorRT's layer "
                         f"precisions (empty, or with ',' or ':')")
    return precisions


def recorded_layer_precisions(metadata: Mapping) -> dict[str, str]:
    """The list a TensorRT ONNX's metadata records (empty for one made without a config)."""
    return dict(metadata.get(LAYER_PRECISIONS_KEY) or {})


def builds_weakly_typed(tensorrt_version: str) -> bool:
    """Whether this TensorRT can build a weakly typed network (where layer precisions apply)."""
    return int(tensorrt_version.split(".")[0]) < FIRST_STRONGLY_TYPED_ONLY


def apply_layer_precisions(trt, network, config, precisions: Mapping[str, str]) -> int:
    """Set each listed layer's precision in the weakly typed ``network`` and the flags that let
    the builder honour them (FP16 and INT8 kernels, preferring the constraints over speed);
    returns how many layers were set. A listed name with no layer is an error: the list would
    silently not apply."""
    types = {FLOAT_LAYER_PRECISION: trt.float16, PINNED_PRECISION: trt.float32}
    found = set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.name in precisions:
            layer.precision = types[precisions[layer.name]]
            found.add(layer.name)
    missing = [name for name in precisions if name not in found]
    if missing:
        raise RuntimeError(f"the TensorRT network has no layer named {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of the "
                           f"{len(precisions)} in the ONNX's layer-precision list); the ONNX "
                           f"parser names layers after ONNX nodes, so the list was made for "
                           f"another graph")
    for flag in (trt.BuilderFlag.FP16, trt.BuilderFlag.INT8,
                 trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS):
        config.set_flag(flag)
    return len(found)


def trtexec_command(onnx_path: str | Path, engine_path: str | Path,
                    precisions: Mapping[str, str]) -> str:
    """The trtexec line that builds the engine with the layer-precision list (TensorRT 10.x,
    weakly typed)."""
    listed = ",".join(f"{name}:{precision}" for name, precision in precisions.items())
    command = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--int8",
               "--fp16", "--precisionConstraints=prefer", f"--layerPrecisions={listed}"]
    return " ".join(shlex.quote(part) for part in command)
