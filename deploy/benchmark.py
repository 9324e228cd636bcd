"""Export the model to every format available here and compare them in one run.

    python deploy/benchmark.py                      # bundled LRFormer-T at 512x512
    python deploy/benchmark.py --variant lrformer-t --checkpoint CKPT --input-size 512 1024

Rows: every registered backend's rows, in registry order (each backend's benchmark.py says
which): by default PyTorch eager FP32 (the ground truth), ONNX Runtime FP32, OpenVINO FP32 / BF16
/ INT8 (NNCF PTQ) / INT8 with BF16 for the float parts; --all adds the other formats (OpenVINO
FP16, the TensorRT FP16 and Q/DQ INT8 ONNX files run by ONNX Runtime, TensorRT engines where
TensorRT and a GPU exist, Core ML), each listed with its status (skipped rows say what they
need). Per row: latency median / p90 / p99 after warm-up, throughput, speed-up over PyTorch (ratio
of medians, same process), mIoU on held-out procedural scenes and pixel agreement with PyTorch.
Writes benchmark.md and benchmark.json.

The title names the CPU and its ISA (AVX2 / AVX-512 / VNNI / AMX / bf16); on a CPU without VNNI a
note says INT8 brings little speed there, and a bf16 row whose hint this CPU runs in f32 is listed
as skipped with that reason. --cpu-isa portable vnni makes one INT8 IR per target
(rows int8 and int8-vnni) to compare the portable form with the VNNI-only one in the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrformer_edge.benchmark import BenchmarkConfig, write_benchmark
from lrformer_edge.cli import (
    add_calibration_arguments,
    add_int8_target_argument,
    add_model_arguments,
    calibration_source,
    check_calibration_arguments,
    check_output_argument,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=20,
                        help="held-out procedural scenes for mIoU and agreement (0: skip)")
    add_calibration_arguments(parser)
    parser.add_argument("--threads", type=int, help="inference threads for ORT/OpenVINO")
    parser.add_argument("--all", action="store_true",
                        help="every format of every registered backend, not only the CPU "
                             "formats of the default table (listed as skipped, with the reason, "
                             "where one cannot run here)")
    add_int8_target_argument(parser, several=True)
    parser.add_argument("--output", default="outputs/benchmark")
    args = parser.parse_args(argv)
    check_calibration_arguments(parser, args)
    check_output_argument(args.output, "--output", "folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = BenchmarkConfig(
        output=Path(args.output), variant=args.variant, checkpoint=args.checkpoint,
        input_size=tuple(args.input_size) if args.input_size else None,
        eval_images=args.eval_images, iterations=args.iterations, warmup=args.warmup,
        calibration_source=calibration_source(args), calibration_images=args.calib_images,
        calibration_seed=args.seed, threads=args.threads, all_formats=args.all,
        int8_targets=tuple(dict.fromkeys(args.cpu_isa)))
    try:
        table = write_benchmark(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n" + table)
    print(f"wrote {config.output}/benchmark.md and benchmark.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
