from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lrformer_edge.reference import DEFAULT_REFERENCE_DIR

# One thread per pytest-xdist worker (they share the cores), two at most otherwise.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else
                      max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session", autouse=True)
def statistics_cache_dir(tmp_path_factory):
    """The suite's calibration statistics cache (and its CLI subprocesses'): never the user's."""
    from lrformer_edge.files import CACHE_ENV

    folder = tmp_path_factory.mktemp("lrformer-edge-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def reference_dir():
    if not (DEFAULT_REFERENCE_DIR / "lrformer-t.golden.npz").is_file():
        pytest.skip(f"official reference data not found at {DEFAULT_REFERENCE_DIR} "
                    f"(a checkout keeps shared/ beside the repository)")
    return DEFAULT_REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_model():
    import lrformer_edge

    torch.manual_seed(0)
    return lrformer_edge.create_model("lrformer-test")


@pytest.fixture
def rgb_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
