"""Exporters: ONNX, OpenVINO; every artifact carries metadata and passes a parity check."""
from __future__ import annotations

import sys

INPUT_ERROR_EXIT = 2
PARITY_FAILURE_EXIT = 1


def run_export_cli(export):
    """Run ``export()`` for a command-line tool: ``(exit code, result or None)``.

    Bad input (checkpoint, dataset, option values: all ValueErrors) and missing SDKs print one
    line and give 2; a failed parity or structure check says nothing was written and gives 1.
    """
    from lrformer_edge.export.onnx import ArtifactCheckError

    try:
        return 0, export()
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return INPUT_ERROR_EXIT, None
    except ArtifactCheckError as error:
        print(f"CHECK FAILED, nothing written: {error}", file=sys.stderr)
        return PARITY_FAILURE_EXIT, None
