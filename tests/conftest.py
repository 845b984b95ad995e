"""Shared fixtures: one local Ray cluster per test session, and sample data made once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray, shared: starting one costs ~7 s, so tests must not each start their own."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, dashboard_host="127.0.0.1")  # the dashboard serves the state API Ray Train polls
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The synthetic source/target datasets, at the size `tl-ray sample-data` writes by default."""
    from tl_ray.sample import write_sample_data

    root = tmp_path_factory.mktemp("sample")
    write_sample_data(root, per_class=200, seed=0)
    return root
