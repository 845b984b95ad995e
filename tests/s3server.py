"""A real S3-protocol server for the tests: moto's server in its own process, on 127.0.0.1 and a free port.

One server per test session (the `s3_server` fixture in conftest.py). It speaks S3 over HTTP as MinIO or AWS would,
so tl-ray is exercised through pyarrow's own S3 client, Ray Train's and Tune's uploads included. Its request log
(werkzeug's access log, one line per request: method, path, query, status) is what tests count requests with:
`S3Server.requests()` parses it, `S3Server.mark()` / `requests(since=...)` scope a count to one step.

Only the process this module started is stopped, by its pid; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
# Fake credentials: moto accepts any; the AWS SDK needs some to sign requests (and must not look for an EC2
# instance's metadata service, whose lookup waits for a timeout on a machine that is not on EC2).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# werkzeug's access log: 127.0.0.1 - - [date] "GET /bucket/key?query HTTP/1.1" 200 -, some wrapped in ANSI colours.
# (It logs no sizes: count bytes from the objects stored, `S3Server.filesystem().get_file_info`.)
_LINE = re.compile(
    r'"(?:\x1b\[[0-9;]*m)*(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+(?:\x1b\[[0-9;]*m)*" (?P<status>\d{3})'
)

# Requests to the server on loopback never go through a proxy. urllib.request.urlopen's global opener reads the
# proxy variables once, at its first use, and keeps them: a test that set a refusing proxy then (tests/unit/
# test_model.py's no-download test) would leave every later urlopen in the process going to it.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Request:
    """One request the server answered."""

    method: str
    path: str  # /bucket/key, percent-encoded as sent
    query: str
    status: int

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").split("/", 1)[0]


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 now (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's S3 server as a child process; `endpoint` is host:port, `url` the http:// form."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = Path(log_dir) / "moto_server.log"
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint as AWS_ENDPOINT_URL takes it."""
        return f"http://{self.endpoint}"

    @property
    def query(self) -> str:
        """The URI query that points pyarrow at this server: `s3://bucket/key?` + query."""
        return f"endpoint_override={self.endpoint}&scheme=http"

    def uri(self, bucket_and_key: str) -> str:
        """`s3://bucket/key?endpoint_override=...&scheme=http`: the URI-query form of an endpoint."""
        return f"s3://{bucket_and_key.strip('/')}?{self.query}"

    def start(self, attempts: int = 3, timeout: float = 30.0) -> S3Server:
        """Start moto_server on a free port and wait until it answers; retried if the port was taken meanwhile."""
        executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        command = [executable] if executable else [sys.executable, "-m", "moto.server"]
        for _ in range(attempts):
            self.port = free_port()
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (held open for the server's life)
            self._process = subprocess.Popen(
                [*command, "-H", HOST, "-p", str(self.port)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **CREDENTIALS},
                start_new_session=True,  # Ctrl-C in the test run reaches pytest, which stops us
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._process.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"moto_server did not start on {HOST}; see {self.log_path}")

    def _answers(self) -> bool:
        try:
            with DIRECT.open(f"{self.url}/moto-api/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the server this object started (SIGTERM, then SIGKILL), by its pid only."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset endpoint)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with DIRECT.open(request, timeout=10):
            pass

    def create_bucket(self, name: str) -> None:
        """A new empty bucket, through pyarrow as a user's tooling would."""
        filesystem = self.filesystem(allow_bucket_creation=True)
        filesystem.create_dir(name)

    def filesystem(self, **options):
        """A pyarrow S3FileSystem on this server, for tests to look at what landed where."""
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            session_token=CREDENTIALS["AWS_SESSION_TOKEN"],
            region=CREDENTIALS["AWS_REGION"],
            endpoint_override=self.endpoint,
            scheme="http",
            **options,
        )

    def mark(self) -> int:
        """The number of requests logged so far: pass it as `since` to count one step's requests."""
        return len(self.requests())

    def requests(self, since: int = 0) -> list[Request]:
        """The S3 requests the server answered (moto's own /moto-api/ calls left out), oldest first."""
        if not self.log_path.exists():
            return []
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _LINE.search(line)
            if match is None:
                continue
            target = match["target"]
            path, _, query = target.partition("?")
            if path.startswith("/moto-api"):
                continue
            found.append(Request(match["method"], path, query, int(match["status"])))
        return found[since:]
