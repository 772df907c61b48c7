"""Real servers on 127.0.0.1 for the remote-store tests and benchmark (never another address).

* `moto_s3()`: moto's S3 API server (threaded, in this process), bound to 127.0.0.1 on a free port.
* `RangeHTTPServer`: a plain HTTP file server for a folder, with GET/HEAD and single `Range: bytes=a-b`
  requests (what `https://` store reads use), served as `http://127.0.0.1:PORT/`.
* `FaultProxy`: an HTTP/1.1 reverse proxy in front of either that injects faults into GET responses that
  carry a body: answer 503 to the first `fail_first` of them, drop the connection halfway through the body
  (`drop`), stall past the client's timeout (`stall`), or fail a random fraction (`fail_rate`, seeded:
  503, dropped body or throttling 429 in turn). `counts` says how many requests of each kind it saw.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """An S3 server on 127.0.0.1 holding an empty `bucket`; yields its endpoint URL. Sets the standard
    AWS environment (endpoint, region, dummy credentials) for this process and its children meanwhile."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIADUALPMTEST0451",
           "AWS_SECRET_ACCESS_KEY": "dualpm-secret-0451"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload_folder(folder: Path, bucket: str, prefix: str, endpoint: str) -> int:
    """Put every file under `folder` at s3://bucket/prefix/<relative path>; returns how many."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
        count += 1
    return count


class _Threaded(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class RangeHTTPServer:
    """Serve `folder` over HTTP on 127.0.0.1 (GET, HEAD, single byte ranges); use as a context manager."""

    def __init__(self, folder: Path):
        root = Path(folder)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _target(self) -> Path | None:
                relative = self.path.split("?", 1)[0].lstrip("/")
                path = (root / relative).resolve()
                return path if path.is_file() and path.is_relative_to(root.resolve()) else None

            def _respond(self, body: bool) -> None:
                path = self._target()
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                found = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if found:
                    start = int(found.group(1))
                    end = min(len(data) - 1, int(found.group(2))) if found.group(2) else len(data) - 1
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    part = data[start : end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    part = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(part)

            def do_GET(self):  # noqa: N802
                self._respond(True)

            def do_HEAD(self):  # noqa: N802
                self._respond(False)

        self.server = _Threaded((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class FaultProxy:
    """HTTP reverse proxy on 127.0.0.1 in front of `upstream` (http://host:port); see the module docstring.

    Faults apply to GET responses with a body of at least 1 byte, counted in arrival order; `stall` is in
    seconds (the proxy then closes the connection without answering).
    """

    def __init__(self, upstream: str, fail_first: int = 0, drop: set[int] | None = None,
                 stall: dict[int, float] | None = None, fail_rate: float = 0.0, seed: int = 0,
                 missing: tuple[str, ...] = ()):
        host, port = upstream.removeprefix("http://").split(":")
        self.fail_first, self.drop, self.stall = fail_first, drop or set(), stall or {}
        self.fail_rate, self.missing = fail_rate, missing
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.gets = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else None
                if any(m in self.path for m in proxy.missing):  # a permanently missing object
                    with proxy.lock:
                        proxy.counts["missing"] += 1
                    self._send(404, b"", [])
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=payload, headers=headers)
                    reply = conn.getresponse()
                    body = reply.read()
                    kept = [(k, v) for k, v in reply.getheaders()
                            if k.lower() not in ("connection", "transfer-encoding", "content-length")]
                finally:
                    conn.close()
                fault = proxy._fault(self.command, reply.status, body)
                with proxy.lock:
                    proxy.counts[fault or "ok"] += 1
                    proxy.counts["requests"] += 1
                if fault == "503" or fault == "429":
                    message = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self._send(int(fault), message, [("Content-Type", "application/xml")])
                elif fault == "drop":  # headers and half the body, then the connection is gone
                    self.send_response(reply.status)
                    for k, v in kept:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif fault == "stall":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                else:
                    self._send(reply.status, body, kept)

            def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward  # noqa: N815

        self.stall_seconds = 0.0
        self.server = _Threaded((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, status: int, body: bytes) -> str | None:
        if method != "GET" or status >= 300 or not body:
            return None
        with self.lock:
            n = self.gets
            self.gets += 1
            if n < self.fail_first:
                return "503"
            if n in self.drop:
                return "drop"
            if n in self.stall:
                self.stall_seconds = self.stall[n]
                return "stall"
            if self.fail_rate and self.rng.random() < self.fail_rate:
                return ("503", "drop", "429")[self.rng.randrange(3)]
        return None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
