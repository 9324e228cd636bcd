"""Export the model to every format available here and compare them in one run.

    python deploy/benchmark.py                      # bundled LRFormer-T at 512x512
    python deploy/benchmark.py --variant lrformer-t --checkpoint CKPT --input-size 512 1024

Rows: PyTorch eager FP32 (the ground truth), ONNX Runtime FP32, OpenVINO FP32 / BF16 / INT8
(NNCF PTQ) / INT8 with BF16 for the float parts; with --all also OpenVINO FP16, the TensorRT FP16
and Q/DQ INT8 ONNX files run by ONNX Runtime, TensorRT engines (where TensorRT and a GPU exist)
and CoreML, each listed with its status (skipped rows say what they need). Per row: latency median / p90 / p99 after
warm-up, throughput, speed-up over PyTorch (ratio of medians, same process), mIoU on held-out
procedural scenes and pixel agreement with PyTorch. Writes benchmark.md and benchmark.json.

The title names the CPU and its ISA (AVX2 / AVX-512 / VNNI / AMX / bf16); on a CPU without VNNI a
note says INT8 brings little speed there, and a bf16 row whose hint this CPU runs in f32 is listed
as skipped with that reason. --cpu-isa portable vnni makes one INT8 IR per target
(rows int8 and int8-vnni) to compare the portable form with the VNNI-only one in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrformer_edge.benchmark import (
    benchmark_title,
    cpu_notes,
    markdown_table,
    rows_as_json,
    run_benchmark,
)
from lrformer_edge.cli import add_int8_target_argument, check_output_argument
from lrformer_edge.cpu import host_cpu
from lrformer_edge.data.calibration import check_calibration_source
from lrformer_edge.files import atomic_write
from lrformer_edge.models.factory import create_model
from lrformer_edge.registry import BUNDLED_MODEL, list_models
from lrformer_edge.resources import check_export_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default=BUNDLED_MODEL, choices=list_models(), metavar="NAME")
    parser.add_argument("--checkpoint")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=20,
                        help="held-out procedural scenes for mIoU and agreement (0: skip)")
    parser.add_argument("--calib-data", default="procedural",
                        help="calibration images: dataset root, image folder or 'procedural'")
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--threads", type=int, help="inference threads for ORT/OpenVINO")
    parser.add_argument("--all", action="store_true",
                        help="every format available here: adds OpenVINO FP16, the TensorRT FP16 "
                             "and Q/DQ INT8 ONNX (ONNX Runtime), TensorRT engines where TensorRT "
                             "and a GPU exist, CoreML (listed as skipped where it cannot run)")
    add_int8_target_argument(parser, several=True)
    parser.add_argument("--output", default="outputs/benchmark")
    args = parser.parse_args(argv)
    check_output_argument(args.output, "--output", "folder")
    try:
        model = create_model(args.variant, checkpoint=args.checkpoint)
        size = check_export_size(model, args.input_size or model.config.data.native_size,
                                 args.calib_images)
        # Unreadable calibration images would otherwise surface after minutes of exports.
        check_calibration_source(args.calib_data, args.calib_images)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    output = Path(args.output)
    rows = run_benchmark(model, size, output / "artifacts", args.eval_images, args.iterations,
                         args.warmup, args.calib_images, args.calib_data, args.threads,
                         all_formats=args.all, int8_targets=tuple(dict.fromkeys(args.cpu_isa)))
    title = benchmark_title(model.config.name, size, args.threads or torch.get_num_threads(),
                            args.eval_images)
    table = markdown_table(rows, title, cpu_notes())
    print("\n" + table)
    atomic_write(output / "benchmark.md", lambda tmp: Path(tmp).write_text(table))
    atomic_write(output / "benchmark.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"title": title, "cpu": host_cpu().as_dict(), "rows": rows_as_json(rows)}, indent=1,
        default=str)))
    print(f"wrote {output}/benchmark.md and benchmark.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
