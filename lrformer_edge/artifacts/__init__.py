"""What every backend shares, below all of them: staging and atomic writes, ExportResult and
ArtifactCheckError, artifact metadata, parity thresholds and the parity check, lazy optional
imports and the Runner interface. Nothing here imports a backend."""
