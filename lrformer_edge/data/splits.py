"""Seed ranges of the procedural splits: training and validation never share a seed."""
from __future__ import annotations

TRAIN_SEED_START = 0
# Validation seeds (checkpoint selection) start far beyond any training set we generate.
VAL_SEED_START = 10_000_000
# Held-out scenes for reported figures: used neither for training nor for picking checkpoints.
TEST_SEED_START = 20_000_000


def split_seeds(train: int, val: int, names=("training", "validation")) -> dict[str, range]:
    if train > VAL_SEED_START:
        raise ValueError(f"at most {VAL_SEED_START} training scenes")
    return {names[0]: range(TRAIN_SEED_START, TRAIN_SEED_START + train),
            names[1]: range(VAL_SEED_START, VAL_SEED_START + val)}
