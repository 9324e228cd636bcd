"""Segment images with a PyTorch checkpoint (the ground truth) and save masks and overlays.

    python deploy/segment.py IMAGE [IMAGE ...] --output out/ [--variant NAME --checkpoint CKPT]

Without --checkpoint the bundled model (lrformer-t.procedural) is used. Labels and overlays are
made at each image's own size (about 8 bytes per class and pixel, plus 32): an image whose
estimate exceeds the available memory is refused with the largest size that fits, and one that
needs more than 1 GiB is noted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from lrformer_edge.cli import check_output_argument
from lrformer_edge.data.datasets import read_image
from lrformer_edge.files import atomic_write
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.registry import BUNDLED_MODEL, list_models
from lrformer_edge.resources import GIB, check_memory

# The network sees the image rescaled to fit (2048, 512); the labels and the overlay are made at
# the image's own size, so a large image costs memory in proportion to its pixels.
NOTE_ABOVE_BYTES = GIB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (jpg/png/...)")
    parser.add_argument("--output", required=True, help="folder for *_labels.png and *_overlay.jpg")
    parser.add_argument("--variant", default=BUNDLED_MODEL, choices=list_models(), metavar="NAME")
    parser.add_argument("--checkpoint", help="checkpoint (.pth/.safetensors); default: bundled")
    parser.add_argument("--opacity", type=float, default=0.5)
    args = parser.parse_args(argv)
    if not 0 <= args.opacity <= 1:
        parser.error("--opacity must lie in [0, 1]")
    check_output_argument(args.output, "--output", "folder")
    try:
        model = create_model(args.variant, checkpoint=args.checkpoint)
    except ValueError as error:  # checkpoint missing, unreadable or not this variant's
        parser.exit(2, f"error: {error}\n")
    if model.variant_note:
        print(model.variant_note)
    output = Path(args.output)
    with SegmentationPipeline.from_model(model) as pipeline:
        for path in args.images:
            try:
                image = read_image(path)
                cost = check_memory(model, image.shape[:2], "segment", what=f"segmenting {path}")
            except ValueError as error:  # unreadable, or too large for this machine's memory
                parser.exit(2, f"error: {error}\n")
            if cost > NOTE_ABOVE_BYTES:
                print(f"note: {path} is {image.shape[1]}x{image.shape[0]}; its labels and overlay "
                      f"are made at full size, about {cost / GIB:.1f} GiB of memory")
            prediction = pipeline.predict(image)
            stem = output / Path(path).stem
            save_image(f"{stem}_labels.png", prediction.labels)
            blended = pipeline.overlay(image, prediction.labels, args.opacity)
            save_image(f"{stem}_overlay.jpg", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
            present = sorted(set(prediction.labels.ravel().tolist()))
            names = ", ".join(model.config.data.class_names[i] for i in present)
            print(f"{path}: {image.shape[1]}x{image.shape[0]} -> input "
                  f"{prediction.input_size[1]}x{prediction.input_size[0]}, "
                  f"{1000 * prediction.inference_seconds:.0f} ms; classes: {names}")
    return 0


def save_image(path: str, array) -> None:
    """Encode by extension and write atomically."""
    ok, encoded = cv2.imencode(Path(path).suffix, array)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))


if __name__ == "__main__":
    raise SystemExit(main())
