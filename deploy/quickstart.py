"""The main job on the embedded default: check, segment, export, validate.

    python deploy/quickstart.py [--images 20] [--output outputs/quickstart] [--no-export]

1. checks the reference implementation against the official golden outputs (when
   ../shared/reference is present);
2. runs the bundled LRFormer-T (PyTorch FP32, the ground truth) through the same
   preprocess -> runner -> postprocess path every backend uses, on procedural validation scenes
   never seen in training or checkpoint selection, and reports mIoU;
3. exports it to ONNX at --size (default: its native size, 512x512; exact static pooling,
   parity-checked) and runs the same scenes through ONNX Runtime, reporting its mIoU and its
   agreement with the ground truth;
4. writes sample panels (image | truth | prediction) and a JSON report.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from lrformer_edge.cli import check_output_argument
from lrformer_edge.data.procedural import check_scene_size
from lrformer_edge.evaluation import (
    evaluate_pipeline,
    keep_labels,
    procedural_validation_samples,
)
from lrformer_edge.files import atomic_write
from lrformer_edge.models.deploy import check_input_size
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.postprocess import colorize
from lrformer_edge.progress import heartbeat
from lrformer_edge.reference import DEFAULT_REFERENCE_DIR, check_against_golden
from lrformer_edge.registry import BUNDLED_MODEL, get_config, input_size_of
from lrformer_edge.resources import check_export_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="validation scenes to segment")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="scene and ONNX input size (default: the model's native size)")
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export/validation")
    parser.add_argument("--reference-dir", default=str(DEFAULT_REFERENCE_DIR),
                        help="official golden outputs (skipped when absent)")
    args = parser.parse_args(argv)
    if args.images <= 0:
        parser.error("--images must be positive")
    args.size = input_size_of(get_config(BUNDLED_MODEL), args.size)
    try:  # before the evaluation, not after it: the export at --size is the last step
        check_scene_size(args.size)
        if not args.no_export:
            args.size = check_input_size(args.size, "--size (the ONNX export's input size)")
            check_export_size(get_config(BUNDLED_MODEL), args.size)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    check_output_argument(args.output, "--output", "folder")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report = {}

    reference = Path(args.reference_dir)
    if (reference / "lrformer-t.golden.npz").is_file():
        with heartbeat("checking against the official golden outputs"):
            golden = check_against_golden(reference)
        report["faithfulness"] = golden
        for case in golden["cases"]:
            print(f"faithful to the official LRFormer-T on {case['shape']}: max error "
                  f"{case['max_abs_error']:.2e} <= {case['tolerance']:.2e}, argmax agreement "
                  f"{100 * case['argmax_agreement']:.3f}% -> {'PASS' if case['passed'] else 'FAIL'}")
    else:
        print(f"(official golden outputs not found in {reference}; faithfulness check skipped)")

    model = create_model(BUNDLED_MODEL)
    print(f"bundled model {BUNDLED_MODEL}: checkpoint sha256 {model.checkpoint_sha256[:16]}...")
    start = time.time()

    def save(sample, prediction):
        if int(sample.name[-4:]) % 5 == 0 or args.images <= 5:
            palette = model.config.data.palette
            panel = np.concatenate([sample.image, colorize(sample.label, palette),
                                    colorize(prediction.labels, palette)], axis=1)
            atomic_write(output / f"{sample.name}.jpg", lambda tmp: Path(tmp).write_bytes(
                cv2.imencode(".jpg", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))[1].tobytes()))

    torch_labels = {}
    remember = keep_labels(torch_labels)

    def keep(sample, prediction):
        remember(sample, prediction)
        save(sample, prediction)

    with SegmentationPipeline.from_model(model) as pipeline:
        metrics = evaluate_pipeline(
            pipeline, procedural_validation_samples(args.images, tuple(args.size)), keep,
            total=args.images, label="PyTorch FP32")
    latency = statistics.median(metrics.pop("inference_seconds"))
    names = model.config.data.class_names
    print(f"\nmIoU on {metrics['images']} held-out procedural scenes ({args.size[0]}x{args.size[1]}): "
          f"{100 * metrics['mIoU']:.2f}%  (pixel accuracy {100 * metrics['aAcc']:.2f}%)")
    for name, iou in zip(names, metrics["IoU"]):
        print(f"  {name:<12} IoU {'  n/a' if iou != iou else f'{100 * iou:5.1f}'}")
    print(f"PyTorch FP32 median latency {1000 * latency:.0f} ms/image; total {time.time() - start:.0f} s")
    report["bundled_model"] = {"variant": BUNDLED_MODEL, "mIoU": metrics["mIoU"],
                               "aAcc": metrics["aAcc"],
                               "IoU": dict(zip(names, metrics["IoU"])),
                               "images": metrics["images"], "median_latency_s": latency}
    if not args.no_export:
        report["onnxruntime"] = export_and_validate(model, args, output, torch_labels, metrics)
    atomic_write(output / "report.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    print(f"report and sample panels (image | truth | prediction) in {output}/")
    failed = "faithfulness" in report and not report["faithfulness"]["passed"]
    return 1 if failed else 0


def export_and_validate(model, args, output: Path, torch_labels: dict, torch_metrics: dict) -> dict:
    """ONNX at the scenes' size, then the same scenes through ONNX Runtime."""
    from lrformer_edge.backends.onnxruntime.export import export_onnx

    size = tuple(args.size)
    result = export_onnx(model, output / f"{BUNDLED_MODEL}-{size[0]}x{size[1]}.onnx", size)
    print("\n" + result.summary())
    with SegmentationPipeline.from_artifact(result.path) as pipeline:
        metrics = evaluate_pipeline(pipeline, procedural_validation_samples(args.images, size),
                                    reference_labels=torch_labels, total=args.images,
                                    label="ONNX Runtime FP32")
    latency = statistics.median(metrics.pop("inference_seconds"))
    agreement = metrics["pixel_agreement"]
    delta = 100 * (metrics["mIoU"] - torch_metrics["mIoU"])
    print(f"ONNX Runtime FP32: mIoU {100 * metrics['mIoU']:.2f}% ({delta:+.3f} vs PyTorch), "
          f"pixel agreement with PyTorch {100 * agreement:.4f}%, median latency "
          f"{1000 * latency:.0f} ms/image")
    return {"artifact": str(result.path), "mIoU": metrics["mIoU"], "mIoU_delta_points": delta,
            "pixel_agreement_vs_pytorch": agreement, "median_latency_s": latency,
            "parity": result.parity.as_dict()}


if __name__ == "__main__":
    raise SystemExit(main())
