"""A fault-injecting HTTP proxy on 127.0.0.1, put between a job and the S3 test server (moto).

Each request is read whole, then, as a fixed schedule says (a share `rate` of requests, the fault kinds
in turn, or a rule for one key): forwarded untouched; answered
503 SlowDown without forwarding; forwarded and then answered 500 InternalError (the request took effect,
the client does not know); cut with a TCP reset before or after forwarding; stalled before forwarding; or
forwarded with its response body cut short under a full Content-Length. `counts` says what it did.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("503", "500_after", "reset_before", "reset_after", "stall", "truncate")
XML = [("Content-Type", "application/xml")]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection"}


def _error(code: str, message: str) -> bytes:
    xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return ('<?xml version="1.0" encoding="UTF-8"?>' + xml).encode()


class FaultProxy:
    """`FaultProxy(upstream_port, rate=0.15, stall_s=1.5, fail_first=None)`; `.url`, `.stop()`.

    fail_first: `(method, key substring, n)`: the first n such requests get 500 InternalError (a fault
    that outlasts the client's own retries, so the job's retry shows)."""

    def __init__(self, upstream_port: int, rate: float = 0.15, stall_s: float = 1.5,
                 fail_first: tuple[str, str, int] | None = None) -> None:  # fmt: skip
        self.upstream_port, self.rate, self.stall_s = upstream_port, rate, stall_s
        self.fail_first = fail_first
        self.every = max(1, round(1 / rate)) if rate > 0 else 0  # 0: a counting proxy, no faults
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def draw(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            self.counts[f"{method} {'LIST' if 'list-type=' in path else 'object'}"] += 1
            forced = self.fail_first and method == self.fail_first[0] and self.fail_first[1] in path
            if forced and self.counts["forced"] < self.fail_first[2]:
                self.counts["forced"] += 1
                return "forced_500"
            # every (1/rate)-th request, each fault kind in turn: every kind shows in a short run
            if not self.every or self.counts["requests"] % self.every:
                return None
            fault = FAULTS[self.counts["faults"] % len(FAULTS)]
            self.counts["faults"] += 1
            self.counts[fault] += 1
            return fault

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.close()

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
            self.send_header("Content-Length", length if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if cut and len(body) > 64:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._reset()
            else:
                self.wfile.write(body)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            try:
                send = body if body or self.command in ("PUT", "POST") else None
                conn.request(self.command, self.path, body=send, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.getheaders(), resp.read()
            finally:
                conn.close()

        def _handle(self) -> None:
            body = self._body()
            fault = proxy.draw(self.command, self.path)
            if fault == "503":
                return self._reply(
                    503, [("Content-Type", "application/xml")], _error("SlowDown", "slow down")
                )
            if fault == "reset_before":
                return self._reset()
            if fault == "stall":
                time.sleep(proxy.stall_s)
            status, headers, data = self._forward(body)
            if fault in ("500_after", "forced_500"):
                return self._reply(
                    500, [("Content-Type", "application/xml")], _error("InternalError", "injected fault")
                )
            if fault == "reset_after":
                return self._reset()
            self._reply(status, headers, data, cut=fault == "truncate" and self.command == "GET")

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
