"""HTTP for bazar-bench: a lean keep-alive client for the load, http.client for
control calls.

The load threads send pre-built requests (`build_request`) over one `LeanConn` each
and parse the answers with `read_response`, so that the client costs little CPU next
to the server on a small machine. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"


class ProtocolError(Exception):
    pass


def build_request(method: str, path: str, port: int, body: Any = None, token: str | None = None,
                  extra: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", "Accept: application/json"]
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        lines.append("Content-Type: application/json")
    if body is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(data)}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def read_response(recv: Callable[[], bytes], buf: bytes = b"") -> tuple[int, bytes, bytes, bool]:
    """Read one HTTP/1.1 response using recv() -> bytes.
    Returns (status, body, leftover_bytes, close)."""

    def more() -> bytes:
        chunk = recv()
        if not chunk:
            raise ProtocolError("connection closed by server")
        return chunk

    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            break
        if len(buf) > 1 << 20:
            raise ProtocolError("response head too long")
        buf += more()
    head, buf = buf[:i], buf[i + 4 :]
    lines = head.split(b"\r\n")
    try:
        version, status_s = lines[0].split(b" ", 2)[:2]
        status = int(status_s)
    except ValueError:
        raise ProtocolError(f"bad status line {lines[0][:80]!r}") from None
    length = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v.strip())
        elif k == b"transfer-encoding":
            chunked = b"chunked" in v.lower()
        elif k == b"connection":
            vl = v.strip().lower()
            if vl == b"close":
                close = True
            elif vl == b"keep-alive":
                close = False
    if 100 <= status < 200 or status in (204, 304):
        return status, b"", buf, close
    if chunked:
        parts: list[bytes] = []
        while True:
            while b"\r\n" not in buf:
                buf += more()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # trailers end with an empty line
                while True:
                    while b"\r\n" not in buf:
                        buf += more()
                    tline, buf = buf.split(b"\r\n", 1)
                    if not tline:
                        break
                return status, b"".join(parts), buf, close
            while len(buf) < size + 2:
                buf += more()
            parts.append(buf[:size])
            buf = buf[size + 2 :]
    if length is not None:
        while len(buf) < length:
            buf += more()
        return status, buf[:length], buf[length:], close
    # no length: body runs until the server closes
    rest = [buf]
    while True:
        chunk = recv()
        if not chunk:
            break
        rest.append(chunk)
    return status, b"".join(rest), b"", True


class LeanConn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        self.close()
        s = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.buf = b""

    def close(self) -> None:
        s, self.sock = self.sock, None
        self.buf = b""
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def abort(self) -> None:
        """Unblock a thread stuck in recv (called from another thread)."""
        s = self.sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def roundtrip(self, raw: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.connect()
        sock = self.sock
        assert sock is not None
        try:
            sock.sendall(raw)
            status, body, self.buf, close = read_response(lambda: sock.recv(65536), self.buf)
        except Exception:
            self.close()
            raise
        if close:
            self.close()
        return status, body


def http_json(port: int, method: str, path: str, body: Any = None, token: str | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """One control-plane call on a fresh connection: (status, parsed JSON or None)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return resp.status, parsed
    finally:
        conn.close()


def health(port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        status, data = http_json(port, "GET", "/health", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None
    return data if status == 200 and isinstance(data, dict) else None
