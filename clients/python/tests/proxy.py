"""A small HTTP/1.1 proxy on a real socket, to cause the faults a client must survive:
forward a request and then drop the connection without the answer (the append happened, the
client does not know), or answer 503 itself before forwarding anything."""

from __future__ import annotations

import socket
import threading
from typing import List, Optional, Tuple


def _read_request(conn: socket.socket) -> Optional[bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


def _with_connection_close(head_and_body: bytes) -> bytes:
    head, _, body = head_and_body.partition(b"\r\n\r\n")
    lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:")]
    lines.insert(1, b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Proxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        #: Requests (method, path) forwarded to the server, and how each ended.
        self.forwarded: List[Tuple[str, str, str]] = []
        #: Forward the next N POSTs, then drop the connection instead of answering.
        self.drop_after_forward = 0
        #: Drop every Nth POST after forwarding it (0: never).
        self.drop_every = 0
        #: Answer the next N POSTs with 503 + Retry-After: 0, forwarding nothing.
        self.fail_503 = 0
        #: The problem code of those 503s.
        self.code_503 = "unavailable"
        self.posts = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            req = _read_request(conn)
            if req is None:
                return
            method, target = req.split(b" ", 2)[:2]
            m, p = method.decode(), target.decode()
            with self.lock:
                is_post = m == "POST"
                if is_post:
                    self.posts += 1
                fail = is_post and self.fail_503 > 0
                if fail:
                    self.fail_503 -= 1
                drop = False
                if is_post and not fail:
                    if self.drop_after_forward > 0:
                        self.drop_after_forward -= 1
                        drop = True
                    elif self.drop_every and self.posts % self.drop_every == 0:
                        drop = True
            if fail:
                body = (
                    b'{"type":"about:blank","title":"Service Unavailable","status":503,"code":"'
                    + self.code_503.encode() + b'","detail":"proxy"}'
                )
                # Recorded before the answer goes out: a client that has its answer may look
                # at `forwarded` at once (recorded after, a fast client sometimes missed it).
                with self.lock:
                    self.forwarded.append((m, p, "503"))
                conn.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
                    b"retry-after: 0\r\nconnection: close\r\ncontent-length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                return
            up = socket.create_connection(self.upstream)
            with up:
                up.sendall(_with_connection_close(req))
                resp = b""
                while True:
                    chunk = up.recv(65536)
                    if not chunk:
                        break
                    resp += chunk
            with self.lock:
                self.forwarded.append((m, p, "dropped" if drop else "answered"))
            if drop:
                # The server did the work; the client never hears of it.
                conn.shutdown(socket.SHUT_RDWR)
                return
            conn.sendall(_with_connection_close(resp))
