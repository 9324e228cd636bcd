"""Segment images with a PyTorch checkpoint (the ground truth) and save masks and overlays.

    python deploy/segment.py IMAGE [IMAGE ...] --output out/ [--variant NAME --checkpoint CKPT]

Without --checkpoint the bundled model (lrformer-t.procedural) is used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from lrformer_edge.data.datasets import DatasetError, read_image
from lrformer_edge.files import atomic_write
from lrformer_edge.models.factory import create_model
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.registry import BUNDLED_MODEL, list_models


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
    model = create_model(args.variant, checkpoint=args.checkpoint)
    output = Path(args.output)
    with SegmentationPipeline.from_model(model) as pipeline:
        for path in args.images:
            try:
                image = read_image(path)
            except DatasetError as error:
                parser.exit(2, f"error: {error}\n")
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
