"""Check the deploy form (and optionally its ONNX export) against the reference model at sizes.

    python deploy/deploy_parity.py --variant lrformer-t.procedural \\
        --sizes 512x512 512x1024 384x640 736x1280 1024x2048 --onnx

Prints, per size: max-abs logits error and argmax agreement of to_deploy() vs the reference
PyTorch model, and with --onnx the same for ONNX Runtime running the exported file, plus the
export time. Exits non-zero if a figure misses its bound (deploy: 1e-4, ONNX: 1e-3 / 99.99%).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lrformer_edge.artifacts.parity import ParityThresholds, parity_inputs
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.metrics import compare_logits, decisive_argmax_agreement
from lrformer_edge.models.deploy import check_input_size, to_deploy
from lrformer_edge.models.factory import create_model
from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict
from lrformer_edge.registry import BUNDLED_MODEL, list_models
from lrformer_edge.resources import check_export_size, check_memory


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes look like 512x1024 (HxW), got {text!r}") from None
    try:
        return check_input_size((height, width))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default=BUNDLED_MODEL, choices=list_models(), metavar="NAME")
    parser.add_argument("--checkpoint")
    parser.add_argument("--reference-weights", action="store_true",
                        help="use the hash-derived weights of the official goldens")
    parser.add_argument("--sizes", type=parse_size, nargs="+",
                        default=[(512, 512), (512, 1024), (384, 640), (736, 1280), (1024, 2048)])
    parser.add_argument("--onnx", action="store_true", help="also export and run ONNX Runtime")
    args = parser.parse_args(argv)
    try:
        model = create_model(args.variant, checkpoint=args.checkpoint,
                             pretrained=not args.reference_weights)
        for size in args.sizes:  # every size before the first is worked on
            if args.onnx:
                check_export_size(model, size)
            else:
                check_memory(model, size, "forward", what=f"running {model.config.name}")
    except ValueError as error:  # checkpoint missing, unreadable or not this variant's; too large
        parser.exit(2, f"error: {error}\n")
    if model.variant_note:
        print(model.variant_note)
    if args.reference_weights:
        model.load_state_dict(reference_state_dict(manifest_of(model)))
    print(f"{model.config.name}: deploy form vs reference (max-abs, argmax agreement on all pixels "
          f"/ on pixels with top-2 margin > 2e-4)")
    failed = False
    for size in args.sizes:
        x = parity_inputs(size)
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
            deployed = to_deploy(model, size)(torch.from_numpy(x)).numpy()
        agreement = compare_logits(reference, deployed)
        decisive, _ = decisive_argmax_agreement(reference, deployed, 2e-4)
        ok = agreement.max_abs < 1e-4 and decisive == 1.0
        failed |= not ok
        line = (f"  {size[0]}x{size[1]:<5} deploy: max-abs {agreement.max_abs:.2e}, argmax "
                f"{100 * agreement.pixel_agreement:.5f}% / {100 * decisive:.3f}%")
        if args.onnx:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.time()
                result = export_onnx(model, Path(tmp) / "m.onnx", size, parity=ParityThresholds())
                seconds = time.time() - start
            p = result.parity
            line += (f" | onnxruntime: max-abs {p.max_abs:.2e}, argmax "
                     f"{100 * p.pixel_agreement:.4f}%, export {seconds:.1f} s")
        print(line + ("" if ok else "  FAIL"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
