"""Fixtures for the data tests: the fault server and download settings small enough for tests."""

from __future__ import annotations

import pytest
from fault_server import FaultServer


@pytest.fixture
def server():
    with FaultServer(slow_s=1.0) as running:
        yield running


@pytest.fixture
def fast_download() -> dict:
    """`prepare` keywords with short timeouts and tiny backoff, so faults resolve in about a second each."""
    return {
        "concurrency": 8,
        "per_host": 8,
        "connect_timeout": 2.0,
        "read_timeout": 0.3,
        "download_timeout": 1.5,
        "retries": 1,
        "backoff": 0.01,
    }
