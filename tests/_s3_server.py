"""A real S3 API on 127.0.0.1 for the tests, and a proxy in front of it that fails requests on purpose.

:func:`start_moto` runs moto's S3 server (``python -m moto.server``, the server mode from PyPI, not an in-memory
fake) in a subprocess on a free loopback port; clients reach it only through ``endpoint_url``. :func:`s3_env`
gives the environment every test and subprocess runs in: dummy credentials, no proxies, no instance-metadata
lookups, no AWS config files, so nothing can talk to any address but 127.0.0.1.

:class:`FaultProxy` is a small HTTP proxy (also on 127.0.0.1) that forwards to the server and, while faults are
queued or a persistent fault is set, answers matching requests (by default: ranged GETs of ``.parquet`` objects,
i.e. shard reads) with a 5xx, closes the connection without an answer, or cuts the body short.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

KEY, SECRET = "AKIAMMPREPTESTKEY01", "mmprep-test-secret-Zq9x"
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def s3_env(tmp: Path) -> dict[str, str | None]:
    """Environment for talking to the loopback server only (None: unset the variable)."""
    env: dict[str, str | None] = {
        "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "AWS_ENDPOINT_URL": None, "AWS_ENDPOINT_URL_S3": None,
        "MMPREP_STORAGE_OPTIONS": None,
    }
    env.update(dict.fromkeys(_PROXY_VARS))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Moto:
    """A running moto S3 server."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()


def start_moto(env: dict[str, str]) -> Moto:
    """Start ``python -m moto.server`` on a free loopback port and wait until it answers."""
    last = ""
    for _ in range(3):  # a port taken between probing and binding: try another
        port = free_port()
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop()): a pipe nobody reads would fill up
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                conn.close()
                return Moto(proc, port, log)
            except OSError:
                time.sleep(0.1)
        proc.kill()
        proc.wait()
        log.seek(0)
        last = log.read().decode(errors="replace")[-500:]
        log.close()
    raise RuntimeError(f"moto server did not start: {last}")


def _shard_read(method: str, path: str, headers: dict[str, str]) -> bool:
    return method == "GET" and "range" in headers and path.split("?", 1)[0].endswith(".parquet")


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that fails matching requests on purpose.

    Faults: ``"500"``/``"503"`` (an S3 error answer), ``"drop"`` (the connection is closed without an answer),
    ``"cut"`` (the answer's body stops halfway, then the connection closes). ``latency`` seconds are added before
    every answer, and with ``bandwidth`` (bytes/s) each answer's body takes its size / bandwidth more: a store
    across a network (first-byte latency, a per-connection throughput) rather than on loopback.
    """

    upstream: int
    match: Callable[[str, str, dict[str, str]], bool] = _shard_read
    queued: deque[str] = field(default_factory=deque)
    persistent: str | None = None
    latency: float = 0.0
    bandwidth: float = 0.0
    injected: int = 0
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def handle_one(self) -> None:
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, kind: str, times: int = 1) -> None:
        with self._lock:
            self.queued.extend([kind] * times)

    def clear(self) -> None:
        with self._lock:
            self.queued.clear()
            self.persistent = None
            self.injected = 0
            self.log.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault_for(self, method: str, path: str, headers: dict[str, str]) -> str | None:
        with self._lock:
            self.log.append((method, path, headers.get("range", "")))
            if not self.match(method, path, headers):
                return None
            kind = self.queued.popleft() if self.queued else self.persistent
            if kind is not None:
                self.injected += 1
            return kind

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._fault_for(h.command, h.path, headers)
        if self.latency:
            time.sleep(self.latency)
        if fault == "drop":
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("500", "503"):
            code = "InternalError" if fault == "500" else "ServiceUnavailable"
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>injected by the test proxy</Message></Error>").encode()
            h.send_response(int(fault))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60)
        try:
            send = {k: v for k, v in h.headers.items()
                    if k.lower() not in ("connection", "keep-alive", "proxy-connection", "transfer-encoding")}
            conn.request(h.command, h.path, body=body, headers=send)
            resp = conn.getresponse()
            data = resp.read()
            upstream_headers = resp.getheaders()
        finally:
            conn.close()
        if self.bandwidth and data:
            time.sleep(len(data) / self.bandwidth)
        h.send_response(resp.status, resp.reason)
        for k, v in upstream_headers:
            if k.lower() in ("transfer-encoding", "connection", "keep-alive"):
                continue
            if k.lower() == "content-length" and h.command != "HEAD":
                continue
            h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "cut":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)


@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or unset, for None) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve_proxy(argv: list[str]) -> None:
    """``python tests/_s3_server.py UPSTREAM_PORT LATENCY_S [BYTES_PER_S]``: a proxy in its own process (so that it
    does not share the measured process's interpreter); prints its port, serves until stdin closes."""
    proxy = FaultProxy(int(argv[0]))
    proxy.latency = float(argv[1])
    proxy.bandwidth = float(argv[2]) if len(argv) > 2 else 0.0
    print(proxy.port, flush=True)
    sys.stdin.read()
    proxy.close()


if __name__ == "__main__":
    _serve_proxy(sys.argv[1:])
