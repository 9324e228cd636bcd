"""Live segmentation from a camera, video, image folder or network stream, on any backend.

    python deploy/camera_demo.py --artifact lrformer-int8/ --source 0 --serve 8080
    python deploy/camera_demo.py --artifact lrformer.onnx --source clip.mp4 --output annotated.mp4
    python deploy/camera_demo.py --artifact lrformer-int8.engine --source rtsp://cam/stream --show

--artifact: an artifact of any registered backend (--help lists them); default: the bundled model
in PyTorch. --precision and the other runner options apply to the backends that declare them.
Live sources (camera index, rtsp/http URL) always hand the newest frame to inference (stale frames
are dropped, so there is no growing lag); files give every frame in order. --serve streams MJPEG
over HTTP on 127.0.0.1 (name --serve-host to expose it); --output writes the annotated video
(renamed into place when the run ends). Ctrl-C, SIGTERM (systemd, docker stop), the end of the
stream, --max-frames or a lost camera end the run with a summary (frames, FPS, stage latencies)
and a finished video. An unreadable frame of a file or folder (corrupt image, truncated video) is
skipped with a warning naming it and counted in the summary; a source with no readable frame at
all is an error (exit 2).
--reference-every N compares every Nth frame with the FP32 PyTorch model (the bundled one, or
--reference CKPT) and shows the running agreement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lrformer_edge.backends import artifact_kinds
from lrformer_edge.cli import (
    add_runner_option_arguments,
    check_output_argument,
    runner_options_from_args,
)
from lrformer_edge.live.demo import (
    DemoOptions,
    open_pipeline,
    reference_pipeline,
    run_demo,
    sigterm_ends_run,
)
from lrformer_edge.live.sources import SourceError
from lrformer_edge.registry import list_models


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", help=f"model to run: {artifact_kinds()} (default: the "
                                           f"bundled PyTorch model)")
    parser.add_argument("--variant", default=None, choices=list_models(), metavar="NAME",
                        help="variant of a PyTorch checkpoint that does not record it (an "
                             "artifact recording another variant is an error)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="network input for PyTorch checkpoints (artifacts have theirs)")
    parser.add_argument("--source", default="0", help="camera index, video file, image folder "
                                                      "or rtsp:// / http:// URL (default 0)")
    parser.add_argument("--output", type=Path, help="annotated video (.mp4 or .avi)")
    parser.add_argument("--serve", type=int, metavar="PORT", help="MJPEG over HTTP on PORT")
    parser.add_argument("--serve-host", default="127.0.0.1",
                        help="address to bind --serve to (default 127.0.0.1: this machine only)")
    parser.add_argument("--hold", action="store_true",
                        help="with --serve: keep serving the last frame after the source ends, "
                             "until Ctrl-C")
    parser.add_argument("--show", action="store_true", help="open a window (needs a display)")
    parser.add_argument("--max-frames", type=int, help="stop after N frames")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity, 0..1")
    add_runner_option_arguments(parser)  # e.g. --precision bf16 for an OpenVINO IR
    parser.add_argument("--reference-every", type=int, default=0, metavar="N",
                        help="compare every Nth frame with the FP32 PyTorch model")
    parser.add_argument("--reference", help="checkpoint of the FP32 reference (default: bundled)")
    parser.add_argument("--summary-json", type=Path, help="also write the summary as JSON")
    args = parser.parse_args(argv)
    if not args.output and args.serve is None and not args.show:
        parser.error("nothing to show: give --output FILE.mp4, --serve PORT or --show")
    if args.reference_every < 0:
        parser.error("--reference-every must be 0 (off) or positive")
    if args.serve is not None and not 0 <= args.serve < 65536:
        parser.error("--serve needs a port number")
    check_output_argument(args.output, "--output")
    check_output_argument(args.summary_json, "--summary-json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    options = DemoOptions(source=args.source, output=args.output,
                          serve=(args.serve_host, args.serve) if args.serve is not None else None,
                          show=args.show, max_frames=args.max_frames, opacity=args.opacity,
                          reference_every=args.reference_every, hold=args.hold)
    try:
        pipeline = open_pipeline(args.artifact, args.variant, args.input_size,
                                 runner_options_from_args(args, args.artifact))
        reference = (reference_pipeline(pipeline, args.variant, args.reference)
                     if args.reference_every else None)
        print(f"running {pipeline.runner.name} on {args.source}", flush=True)
        with sigterm_ends_run():
            summary = run_demo(
                pipeline, options, reference,
                on_server_ready=lambda server: print(f"serving MJPEG at {server.url}", flush=True),
                on_hold=lambda summary: print(f"{summary.end_reason} after {summary.frames} "
                                              f"frames; still serving the last frame, Ctrl-C to "
                                              f"stop", flush=True),
                on_skip=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    except (SourceError, ValueError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
