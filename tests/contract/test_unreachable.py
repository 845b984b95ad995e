"""Object storage that never answers: `tl-ray inspect` ends within a bound with one line naming the URI and what to
check, exit 2, and nothing written (issue 39).

The "cloud" is a loopback socket that accepts connections and never answers (a blackhole), given as the S3 endpoint
and as the GCS endpoint (and GCS's metadata server, so that its credential lookup stays on loopback too).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3server import CREDENTIALS

from tl_ray.errors import EXIT_USAGE

pytestmark = pytest.mark.timeout(240)
BOUND_S = 60


@pytest.fixture(scope="module")
def blackhole():
    """127.0.0.1:PORT, accepting and never answering, closed at the end of the module."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for connection in held:
        connection.close()
    server.close()


@pytest.mark.parametrize(
    "scheme", ["s3", pytest.param("gs", marks=pytest.mark.extended)]
)  # gs: make test's 30 minutes (CI ran 35 at 6b881ac)
def test_inspect_of_unreachable_storage_is_one_line_within_a_bound(blackhole, scheme, tmp_path):
    uri = f"{scheme}://bucket/images?endpoint_override={blackhole}&scheme=http"
    environment = {
        **{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        **CREDENTIALS,
        "GCE_METADATA_ROOT": blackhole,
        "GCE_METADATA_HOST": blackhole,
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tl_ray.cli", "inspect", "--data", uri],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=BOUND_S + 60,
    )
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_S, (elapsed, done.stderr)
    assert done.returncode == EXIT_USAGE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tl-ray: error: --data: cannot read {uri}: ")
    assert "check the endpoint" in lines[0]
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []
