"""Data: preprocessing, postprocessing, procedural scenes and dataset readers."""
