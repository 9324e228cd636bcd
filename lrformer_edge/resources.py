"""Memory a run needs, estimated from its size before the work starts.

An export at 8192x8192 grows past 10 GiB and one at 100000x100000 allocates until the machine
gives up; both are refused up front instead, naming the estimate, what is available and the
largest size of the same aspect ratio that fits. The model is simple and errs on the large side:

    bytes = fixed(task, architecture) + H * W * per-pixel bytes(task, architecture, classes)

Coefficients were measured as the growth of the peak resident set (``ru_maxrss``) of a fresh
process doing the task at two or three sizes (256, 512, 768 or 1024 squared; one thread, x86-64,
torch 2.x CPU) and are used rounded up by ``SAFETY`` (C: classes):

* ``export``: ``EXPORT_BYTES_PER_CLASS * C`` + the architecture's part (``MEASURED_EXPORT``).
  An ONNX export (export, then the ONNX Runtime parity check) grew by 7.0 kB/px for
  lrformer-test (150 classes), 2.8-3.1 kB/px for lrformer-t with 12 classes and 8.4 with 150
  (hence 40 bytes per class and pixel), 8.3 for s and 8.5 for b (150 classes), 10.8-11.1 for l
  (19 classes); the fixed part from 0.1 GiB (test) to 2 GiB (l). OpenVINO's FP32 export goes
  through the ONNX export and measured the same (2.4 kB/px, lrformer-t, 12 classes). Quantized
  exports (``calibration_images`` > 0) keep every calibration image in memory (12 bytes per
  pixel each) and run NNCF and an int8 parity check on top: OpenVINO INT8 of lrformer-t with
  16 images grew by 4.7 kB/px and 571 MiB fixed, modelled as twice the architecture's part and
  ``QUANTIZED_FIXED_FACTOR`` times its fixed part. Core ML and TensorRT exports, not measured,
  are given the same figures (TensorRT's ONNX step is an ONNX export plus NNCF, as above).
* ``forward``: one eager PyTorch forward (counting GMACs): 0.6 to 0.9 kB/px for every variant
  and class count measured, modelled as ``FORWARD_BYTES_PER_PIXEL + 4 * C`` with the export's
  fixed part (a forward measured 0.2 GiB fixed).
* ``segment``: post-processing an image at its own size (logits resized to the whole image,
  argmax, overlay, encoding): 102-108 B/px for the bundled model (12 classes) at 2048x2048 and
  4096x4096 (8000x8000 peaked at 6.5 GiB), modelled as ``8 * C + 32``. The network's input is
  rescaled to fit (2048, 512) by the official test transform, so the image, not the network, is
  the cost there.

An architecture that was not measured is given the largest measured figures. The available
memory is the kernel's MemAvailable, within a cgroup v2 limit and ``$LRFORMER_EDGE_MAX_MEMORY_GIB``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from lrformer_edge.registry import get_config, input_size_of

GIB = 2**30
MIB = 2**20
SAFETY = 1.25  # measured figures are rounded up by this factor
EXPORT_BYTES_PER_CLASS = 50  # 40 measured
CALIBRATION_BYTES_PER_IMAGE_PIXEL = 12  # (1, 3, H, W) float32 per calibration image
QUANTIZED_FIXED_FACTOR = 1.5  # int8 exports: NNCF and the int8 parity check on top of FP32
FORWARD_BYTES_PER_PIXEL = 1100
SEGMENT_BYTES_PER_CLASS = 8  # the resized float32 logits and their concatenated copy
SEGMENT_BYTES_PER_PIXEL = 32  # image, labels, argmax indices, overlay
TASKS = ("export", "forward", "segment")
MEMORY_CAP_VARIABLE = "LRFORMER_EDGE_MAX_MEMORY_GIB"
# Measured per architecture: (fixed MiB, bytes per pixel without the logits' share).
MEASURED_EXPORT = {"lrformer-test": (100, 1000), "lrformer-t": (440, 2300),
                   "lrformer-s": (610, 2300), "lrformer-b": (1370, 2500),
                   "lrformer-l": (2080, 10400)}


def _export_costs(arch) -> tuple[int, int]:
    """(fixed bytes, per-pixel bytes) of an architecture's export, rounded up; the largest
    measured ones for an architecture that was not measured."""
    costs = {get_config(name).arch: (math.ceil(SAFETY * fixed * MIB), math.ceil(SAFETY * pixel))
             for name, (fixed, pixel) in MEASURED_EXPORT.items()}
    return costs.get(arch, tuple(max(values) for values in zip(*costs.values())))


def available_memory_bytes() -> int | None:
    """Memory this process can use without swapping, if it can be told: the kernel's
    MemAvailable (else free pages), within a cgroup v2 limit (containers), within
    ``$LRFORMER_EDGE_MAX_MEMORY_GIB`` (a cap for shared machines)."""
    limits = [_meminfo_available(), _cgroup_headroom()]
    cap = os.environ.get(MEMORY_CAP_VARIABLE)
    if cap:
        try:
            limits.append(int(float(cap) * GIB))
        except ValueError:
            raise ValueError(f"${MEMORY_CAP_VARIABLE} must be a number of GiB, "
                             f"got {cap!r}") from None
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _amount(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{math.ceil(size / MIB)} MiB"


def memory_model(config, task: str, calibration_images: int = 0) -> tuple[int, int]:
    """(fixed bytes, bytes per pixel) of ``task`` for a model of ``config`` (see the module)."""
    classes = config.num_classes
    fixed, arch_pixel = _export_costs(config.arch)
    if task == "export" and calibration_images:
        fixed, arch_pixel = math.ceil(QUANTIZED_FIXED_FACTOR * fixed), 2 * arch_pixel
    if task == "export":
        return fixed, (EXPORT_BYTES_PER_CLASS * classes + arch_pixel
                       + CALIBRATION_BYTES_PER_IMAGE_PIXEL * calibration_images)
    if task == "forward":
        return fixed, FORWARD_BYTES_PER_PIXEL + 4 * classes
    if task == "segment":  # the model is loaded already: only the image's own cost is new
        return 0, SEGMENT_BYTES_PER_CLASS * classes + SEGMENT_BYTES_PER_PIXEL
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def estimate_memory(config, size, task: str = "export", calibration_images: int = 0) -> int:
    """Bytes ``task`` needs at ``size`` = (H, W) for a model of ``config`` (see the module)."""
    height, width = (int(v) for v in size)
    fixed, per_pixel = memory_model(config, task, calibration_images)
    return fixed + height * width * per_pixel


def largest_fitting_size(size, budget: int, fixed: int, per_pixel: int,
                         alignment: int = 32) -> tuple[int, int] | None:
    """The largest (H, W) of ``size``'s aspect ratio, multiples of ``alignment``, in budget."""
    height, width = (int(v) for v in size)
    pixels = (budget - fixed) / per_pixel
    if pixels < alignment * alignment:
        return None
    scale = min(1.0, math.sqrt(pixels / (height * width)))
    fitted = [max(alignment, int(v * scale) // alignment * alignment) for v in (height, width)]
    while fitted[0] * fitted[1] > pixels:  # the alignment floor can overshoot on thin sizes
        index = 0 if fitted[0] >= fitted[1] else 1
        if fitted[index] == alignment:
            return None
        fitted[index] -= alignment
    return fitted[0], fitted[1]


def check_memory(model_or_config, size, task: str = "export", calibration_images: int = 0,
                 available: int | None = None, what: str | None = None) -> int:
    """Raise ValueError when ``task`` at ``size`` would need more memory than is available.

    ``model_or_config``: a model from ``create_model`` or its ModelConfig; ``what`` names the
    work in the message. Returns the estimate in bytes (also when the available memory cannot
    be read: then nothing is refused).
    """
    config = getattr(model_or_config, "config", model_or_config)
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {height}x{width}")
    estimate = estimate_memory(config, (height, width), task, calibration_images)
    available = available_memory_bytes() if available is None else available
    if available is None or estimate <= available:
        return estimate
    fixed, per_pixel = memory_model(config, task, calibration_images)
    fitted = largest_fitting_size((height, width), available, fixed, per_pixel,
                                  1 if task == "segment" else 32)
    advice = (f"the largest {'image' if task == 'segment' else 'size'} of this aspect ratio that "
              f"fits is {fitted[0]}x{fitted[1]}" if fitted else "no size fits")
    raise ValueError(
        f"{what or f'{task} with {config.name}'} at {height}x{width} needs about "
        f"{_amount(estimate)} of memory (estimate, see lrformer_edge/resources.py), but "
        f"{_amount(available)} are available; {advice}")


def check_export_size(model_or_config, size=None, calibration_images: int = 0) -> tuple[int, int]:
    """An export's input size: ``size``, else the variant's native size (``input_size_of``),
    multiples of 32 (else the nearest valid size is named) and within the memory this machine has
    (else the estimate and the largest size that fits are named)."""
    from lrformer_edge.models.deploy import (
        check_input_size,  # PyTorch: only for exports
    )

    size = check_input_size(input_size_of(model_or_config, size))
    config = getattr(model_or_config, "config", model_or_config)
    check_memory(config, size, "export", calibration_images, what=f"exporting {config.name}")
    return size
