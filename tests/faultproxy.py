"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test S3 server: storage that misbehaves on demand.

A test points pyarrow's S3 client at the proxy's endpoint instead of moto's and says which requests fail and how
(``fail``: the first N GETs of each object whose key matches a pattern answered 503 SlowDown, as S3 throttles, or,
with ``status=RESET``, cut off half-way through the object's bytes).
Every request is counted by method and key, so a test asserts what reached the storage. The proxy serves only
loopback, stops by itself after ``max_requests`` (a test that loops cannot hammer anything) and is stopped by
the test (a context manager).
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOST = "127.0.0.1"
RESET = 0  # a fault "status": the object's headers and half its bytes, then the connection dropped (a reset mid-object)
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)


@dataclass
class Rule:
    """The first ``times`` requests of ``method`` to each key matching ``pattern`` get ``status``."""

    pattern: re.Pattern[str]
    times: int
    method: str = "GET"
    status: int = 503
    seen: Counter = field(default_factory=Counter)  # key -> requests answered with the fault so far


class FaultProxy:
    def __init__(self, upstream: str, max_requests: int = 20_000) -> None:
        self.upstream = upstream  # HOST:PORT of the S3 server
        self.max_requests = max_requests
        self.rules: list[Rule] = []
        self.requests: Counter = Counter()  # (method, key) -> requests received
        self.faults: Counter = Counter()  # (method, key) -> requests answered with a fault
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self._server.server_address[1]}"

    def uri(self, bucket_and_key: str) -> str:
        """`s3://bucket/key?endpoint_override=...&scheme=http` through the proxy."""
        return f"s3://{bucket_and_key.strip('/')}?endpoint_override={self.endpoint}&scheme=http"

    def fail(self, pattern: str, times: int, method: str = "GET", status: int = 503) -> None:
        """Answer the first ``times`` ``method`` requests of each key matching ``pattern`` with ``status``."""
        with self._lock:
            self.rules.append(Rule(re.compile(pattern), times, method, status))

    def heal(self) -> None:
        """No more faults: every request reaches the storage."""
        with self._lock:
            self.rules.clear()

    def count(self, method: str, pattern: str = "") -> int:
        """Requests received of ``method`` to keys matching ``pattern``."""
        with self._lock:
            return sum(n for (m, key), n in self.requests.items() if m == method and re.search(pattern, key))

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _fault_for(self, method: str, key: str) -> int | None:
        with self._lock:
            self.requests[method, key] += 1
            if sum(self.requests.values()) > self.max_requests:
                return 429
            for rule in self.rules:
                if rule.method == method and rule.pattern.search(key) and rule.seen[key] < rule.times:
                    rule.seen[key] += 1
                    self.faults[method, key] += 1
                    return rule.status
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet: the counters are the record
                pass

            def _body(self) -> bytes:
                """The request's body as sent: the AWS SDK uploads parts chunked (aws-chunked inside HTTP chunked
                transfer encoding, after a 100-continue that the base class answers), passed on as it came."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = bytearray()
                while True:
                    line = self.rfile.readline(65536)
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:  # the last chunk, then trailers up to a blank line
                        while (trailer := self.rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
                            raw += trailer
                        return bytes(raw + b"\r\n")
                    raw += self.rfile.read(size + 2)  # the chunk and its CRLF

            def _forward(self) -> None:
                key = urlsplit(self.path).path
                body = self._body()
                status = proxy._fault_for(self.command, key)
                if status is not None and status != RESET:
                    payload = SLOW_DOWN if self.command != "HEAD" else b""
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {name: value for name, value in self.headers.items() if name.lower() != "expect"}
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    # A HEAD's Content-Length is the object's size: passed on; a body's is what is sent here.
                    if name.lower() not in ("transfer-encoding", "connection", "content-length") or (
                        name.lower() == "content-length" and self.command == "HEAD"
                    ):
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if status == RESET:  # the promised length, half of it sent, and the connection gone
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
