"""Where an OpenVINO IR spends its time: per-node profile (PERF_COUNT) at an explicit precision.

    python deploy/profile_openvino.py --ir lrformer-int8/ --precision f32
    python deploy/profile_openvino.py --ir lrformer-int8/ --precision bf16 --top 30 --json prof.json

Prints the time by node type and kernel (e.g. Convolution / brgconv_avx512_1x1_I8, Reorder /
reorder_f32) and the slowest nodes, averaged over --repeats inferences on a random input of the
IR's shape. Kernels ending in _I8 run int8; Reorder and Transpose rows are layout copies.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lrformer_edge.artifacts.optional import MissingDependencyError
from lrformer_edge.artifacts.runner import RunnerStateError
from lrformer_edge.backends.openvino.profile import profile_ir, profile_table
from lrformer_edge.backends.openvino.runner import PRECISIONS
from lrformer_edge.files import atomic_write


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ir", required=True, help="OpenVINO .xml, or the folder holding one")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32",
                        help="inference precision hint for the non-quantized parts (default f32)")
    parser.add_argument("--threads", type=int, help="inference threads (default: OpenVINO's)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=15, help="slowest nodes to list")
    parser.add_argument("--json", help="also write the whole profile here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.top < 0:
        parser.error("--repeats must be positive and --top non-negative")
    try:
        profile, settings, ir = profile_ir(args.ir, args.precision, args.threads, args.repeats)
    except (ValueError, MissingDependencyError, RunnerStateError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{ir.name}: precision {settings['inference_precision']}, "
          f"{settings['threads']} threads, {settings['streams']} stream(s), OpenVINO "
          f"{settings['openvino']}")
    print(profile_table(profile, args.top))
    if args.json:
        payload = {"ir": str(ir), "settings": settings, **profile.as_dict()}
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
