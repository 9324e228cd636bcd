"""Exporters: ONNX, OpenVINO; every artifact carries metadata and passes a parity check."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lrformer_edge.metrics import Agreement

INPUT_ERROR_EXIT = 2
PARITY_FAILURE_EXIT = 1


def run_export_cli(export):
    """Run ``export()`` for a command-line tool: ``(exit code, result or None)``.

    Bad input (checkpoint, dataset, option values: all ValueErrors) and missing SDKs print one
    line and give 2; a failed parity or structure check says nothing was written and gives 1.
    """
    from lrformer_edge.artifacts.result import ArtifactCheckError

    try:
        return 0, export()
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return INPUT_ERROR_EXIT, None
    except ArtifactCheckError as error:
        print(f"CHECK FAILED, nothing written: {error}", file=sys.stderr)
        return PARITY_FAILURE_EXIT, None


class ArtifactCheckError(RuntimeError):
    """An artifact failed a check before it was written (so nothing was written)."""


@dataclass
class ExportResult:
    path: Path
    parity: Agreement | None
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        from lrformer_edge.files import artifact_size_bytes

        size = artifact_size_bytes(self.path) / 2**20
        nodes = f"{sum(self.op_counts.values())} nodes, " if self.op_counts else ""
        lines = [f"wrote {self.path} ({size:.1f} MiB, {nodes}{self.seconds:.1f} s)"]
        if self.parity is not None:
            p = self.parity
            lines.append(f"parity vs PyTorch: max-abs {p.max_abs:.2e}, cosine {p.cosine:.7f}, "
                         f"argmax agreement {100 * p.pixel_agreement:.4f}%")
        return "\n".join(lines)


