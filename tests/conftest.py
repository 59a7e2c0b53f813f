"""Fixtures shared by every test module."""

import os

# Before anything imports torch: idle OpenMP threads sleep instead of spinning. On a busy 2-core machine the
# default (spinning) made ResNet-20 inference 3-10x slower with 2 threads; the setting must precede the
# OpenMP runtime's start, hence here. An explicit value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def bitsearch_data_dir(tmp_path_factory):
    """Point `BITSEARCH_DATA_DIR` at a per-session temporary folder, so no test reads or writes the user's
    `~/.bitsearch`; zoo models trained by one test are reused by the others in the same session."""
    path = tmp_path_factory.mktemp("bitsearch-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITSEARCH_DATA_DIR", str(path))
        yield path
