"""How a Core ML package stores each layer's weight: the one rule the exporter applies, the
package check verifies and the sensitivity selection sizes packages by.

A layer gets its precision (a precision config's, or the export's ``weights`` for every layer):

* ``palette4``: 4-bit k-means palette; from iOS18 one 16-entry fp16 LUT per group of 16 output
  channels, before that one LUT per tensor. A layer whose output channels do not divide into
  groups of 16 cannot be grouped and stays float (coremltools skips it): in LRFormer-T the
  stem's 24-channel ``patch_embed1.conv1.3`` and a ``decode_head.conv_seg`` of 12 or 150
  classes.
* ``weights-int4``: 4-bit linear, symmetric, one fp16 scale per output channel (iOS18+).
* ``int8``: 8-bit linear, symmetric, one fp16 scale per output channel.
* ``float``: the program's float type (fp16 for FP16 packages).

A layer of at most ``COMPRESSION_MIN_WEIGHTS`` weights stays float whatever its precision: its
compression saves nothing and costs accuracy (13 of LRFormer-T's 131 layers, 0.1 MiB in fp16:
the shared ``d_convs`` and the ``cpe`` depthwise kernels of stages 1-2, and the stem's first
convolution). Only layers are compressed; every other constant (biases, BatchNorm, attention
pooling matrices) stays float.

A kernel the converter folded a BatchNorm or layer scale into (``layer_map``) is compressed as
stored, i.e. ``weight * scale``: per-channel int8/int4 are unchanged by that scale, a palette
(shared by 16 channels) is not.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from lrformer_edge.artifacts.precision_config import FLOAT

COMPRESSION_MIN_WEIGHTS = 2048
PALETTE_GROUP_SIZE = 16
PALETTE_BITS = 4
GROUPED_PALETTE_TARGETS = ("iOS18", "macOS15")
INT4_TARGETS = ("iOS18", "macOS15")
# Precision of a config (or of every layer) -> CoreMLOptions.weights.
WEIGHTS_OF_PRECISION = {"palette4": "palette4", "weights-int4": "int4", "int8": "int8",
                        FLOAT: "float"}
PRECISION_OF_WEIGHTS = {weights: precision for precision, weights in WEIGHTS_OF_PRECISION.items()}
# The storage kinds the package inspection reports (inspect._weight_ops), by weights option.
FORM_OF_WEIGHTS = {"palette4": "palettized", "int4": "int4", "int8": "int8"}
# Core ML's weight file: every stored tensor has a 64-byte header and is padded to 64 bytes.
BLOB_ALIGNMENT = 64


def stored_form(layer, precision: str, target: str = "iOS18", float_form: str = "float16") -> str:
    """The form ``layer`` (``models.layers.Layer``) takes in a package at ``precision``:
    "palettized", "int4", "int8" or ``float_form`` (the program's float type)."""
    weights = WEIGHTS_OF_PRECISION[precision]
    if weights == "float" or layer.weight_elements <= COMPRESSION_MIN_WEIGHTS:
        return float_form
    if weights == "palette4" and target in GROUPED_PALETTE_TARGETS \
            and layer.out_channels % PALETTE_GROUP_SIZE:
        return float_form
    return FORM_OF_WEIGHTS[weights]


def keeps_float(layer, precision: str, target: str = "iOS18") -> bool:
    """Whether a package leaves ``layer``'s weight uncompressed at ``precision`` (``stored_form``:
    a small layer, an ungroupable palette, or ``float`` itself). The sensitivity simulation leaves
    exactly these layers float."""
    return stored_form(layer, precision, target, float_form=FLOAT) == FLOAT


def stored_weight_bytes(layer, form: str, float_bytes: int = 2, target: str = "iOS18") -> int:
    """Bytes of ``layer``'s weight stored in ``form`` (a ``stored_form``), without the weight
    file's per-tensor header and padding (``BLOB_ALIGNMENT``)."""
    elements, channels = layer.weight_elements, layer.out_channels
    if form == "int8":
        return elements + float_bytes * channels
    if form == "int4":
        return (elements + 1) // 2 + float_bytes * channels
    if form == "palettized":
        tables = channels // PALETTE_GROUP_SIZE if target in GROUPED_PALETTE_TARGETS else 1
        return (elements * PALETTE_BITS + 7) // 8 + tables * (2 ** PALETTE_BITS) * float_bytes
    return elements * float_bytes


def compressed_weight_bytes(layers: Iterable, precision_of: Callable[[str], str],
                            target: str = "iOS18") -> int:
    """Bytes the weights of ``layers`` take in an FP16 package where layer ``name`` has
    ``precision_of(name)`` (e.g. ``PrecisionConfig.precision_of``), by the rule the exporter
    applies (``stored_form``: small layers and ungroupable palettes stay fp16). Everything else
    in a package (biases, norms, pooling matrices: fp16; the program; 64 bytes of header and
    padding per stored tensor) comes on top."""
    return sum(stored_weight_bytes(layer, stored_form(layer, precision_of(layer.name), target),
                                   target=target)
               for layer in layers)


def layer_precisions(layers: Iterable, weights: str, precision_config=None) -> dict[str, str]:
    """Layer -> precision: the config's where one is given, else ``weights`` (an export's
    option) for every layer."""
    if precision_config is not None:
        return {layer.name: precision_config.precision_of(layer.name) for layer in layers}
    return {layer.name: PRECISION_OF_WEIGHTS[weights] for layer in layers}


def expected_forms(layers: Iterable, precisions: Mapping[str, str], target: str,
                   float_form: str) -> dict[str, str]:
    return {layer.name: stored_form(layer, precisions[layer.name], target, float_form)
            for layer in layers}


def compress(mlmodel, forms: Mapping[str, str], const_of: Mapping[str, str], target: str):
    """``mlmodel`` with each layer's weight constant (``const_of[layer]``) compressed to its
    form (``forms[layer]``), every other constant left as it is. Linear quantization runs first
    and palettization second; each pass names only its own layers, so no weight is compressed
    twice (a constant already feeding a compressed op is also skipped by coremltools)."""
    import coremltools.optimize.coreml as cto

    def configs(wanted: str, config) -> dict:
        return {const_of[layer]: config for layer, form in forms.items() if form == wanted}

    # Layers are chosen by name; the threshold only stops coremltools' own size rule
    # (``stored_form`` applies ours) from skipping any of them.
    everything = {"weight_threshold": 0}
    linear = {**configs("int8", cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", **everything)),
        **configs("int4", cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_channel", **everything))}
    if linear:
        mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(
            op_name_configs=linear))
    # iOS18 packages hold one LUT per group of output channels: far smaller errors than one
    # LUT per tensor, for a few hundred bytes per layer.
    grouped = {"granularity": "per_grouped_channel", "group_size": PALETTE_GROUP_SIZE} \
        if target in GROUPED_PALETTE_TARGETS else {}
    palettes = configs("palettized", cto.OpPalettizerConfig(
        mode="kmeans", nbits=PALETTE_BITS, **grouped, **everything))
    if palettes:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=palettes))
    return mlmodel
