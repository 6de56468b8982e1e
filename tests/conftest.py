"""Shared fixtures. Everything is built in code: nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# One OpenMP thread per process: the tests run ServerApp, SuperNodes and ClientApps side
# by side on a 2-core machine, where spinning OpenMP threads of several torch processes
# slow each other down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD pipeline in diffusers format (not a real model)."""
    from fedsd.model import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def bare_app_dir() -> Path:
    """A trivial Message-API Flower app (no torch), for deployment tests and benchmarks."""
    return Path(__file__).parent / "fixtures" / "bare_app"
