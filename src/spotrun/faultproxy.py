"""A loopback proxy that faults real connections to PostgreSQL: it blackholes the link, or
cuts it right after the server's reply to a chosen statement (the write committed, its
caller never hears so). For ``spotrun chaos`` and the tests; clients connect to it as they
would to the server."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    def __init__(self, proxy: PgProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = socket.create_connection(("127.0.0.1", proxy.target_port))
        self.doomed_by: bytes | None = None
        self.closed = False
        for fn in (self._up, self._down):
            threading.Thread(target=fn, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        _close(self.client)
        _close(self.server)

    def _up(self) -> None:
        """Client to server, message by message; a statement holding an armed marker
        dooms the link (by its text, or by the name it was prepared under)."""
        buf = b""
        started = False
        prepared: dict[bytes, bytes] = {}  # statement name -> its text, on this link
        try:
            while not self.closed:
                data = self.client.recv(65536)
                if not data:
                    break
                if self.proxy.blackholed:
                    continue
                buf += data
                while True:
                    if not started:  # the startup message has no type byte
                        if len(buf) < 4:
                            break
                        (length,) = struct.unpack("!i", buf[:4])
                        if len(buf) < length:
                            break
                        started = True
                        buf = buf[length:]
                        continue
                    if len(buf) < 5:
                        break
                    (length,) = struct.unpack("!i", buf[1:5])
                    if len(buf) < 1 + length:
                        break
                    kind, body, buf = buf[:1], buf[5:1 + length], buf[1 + length:]
                    self._look_at(kind, body, prepared)
                self.server.sendall(data)
        except OSError:
            pass
        if not self.proxy.blackholed:
            self.close()

    def _look_at(self, kind: bytes, body: bytes, prepared: dict[bytes, bytes]) -> None:
        text = b""
        if kind == b"Q":
            text = body
        elif kind == b"P":
            name, _, rest = body.partition(b"\0")
            text = rest.partition(b"\0")[0]
            prepared[name] = text
        elif kind == b"B":
            _portal, _, rest = body.partition(b"\0")
            text = prepared.get(rest.partition(b"\0")[0], b"")
        if text and self.doomed_by is None:
            self.doomed_by = self.proxy.take_marker(text)

    def _down(self) -> None:
        """Server to client, message by message (every server message is typed)."""
        buf = b""
        try:
            while not self.closed:
                data = self.server.recv(65536)
                if not data:
                    break
                if self.proxy.blackholed:
                    continue
                buf += data
                out = b""
                while len(buf) >= 5:
                    kind = buf[:1]
                    (length,) = struct.unpack("!i", buf[1:5])
                    if len(buf) < 1 + length:
                        break
                    msg, buf = buf[:1 + length], buf[1 + length:]
                    if kind == b"Z" and self.doomed_by is not None:
                        # The statement committed and the server said so: the client never
                        # hears it.
                        self.proxy.cut.append(self.doomed_by)
                        self.close()
                        return
                    out += msg
                if out and self.doomed_by is None:
                    self.client.sendall(out)
                elif out:
                    pass  # the reply to a doomed statement is dropped with its link
        except OSError:
            pass
        if not self.proxy.blackholed:
            self.close()


class PgProxy:
    """A TCP proxy to a PostgreSQL server on loopback.

    ``url_for(url)`` is the URL to give the code under test (SSL off, so that the proxy
    sees the protocol). ``blackhole()`` silently drops every byte both ways on every link,
    old and new, keeping the sockets open (no reset, no reply), until ``heal()``.
    ``cut_after_reply(marker)`` arms a cut: the next statement whose text holds ``marker``
    reaches the server and commits; its link is closed right after the server's reply,
    which the client never sees. ``cut`` lists the markers whose cut happened.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackholed = False
        self.cut: list[bytes] = []
        self._markers: list[bytes] = []
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._held: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def url_for(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0] + "@" if len(netloc) == 2 else ""
        query = "sslmode=disable&gssencmode=disable"
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path,
                           query, ""))

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.blackholed:
                # Accepted by the kernel, then silence: like a SYN answered by a dead NAT.
                with self._lock:
                    self._held.append(client)
                continue
            try:
                link = _Link(self, client)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._links.append(link)

    def take_marker(self, data: bytes) -> bytes | None:
        with self._lock:
            for m in self._markers:
                if m in data:
                    self._markers.remove(m)
                    return m
        return None

    def cut_after_reply(self, marker: bytes) -> None:
        with self._lock:
            self._markers.append(marker)

    def blackhole(self) -> None:
        self.blackholed = True

    def heal(self) -> None:
        """End the blackhole: the links it held are gone (as TCP would end them)."""
        self.blackholed = False
        with self._lock:
            links, self._links = self._links, []
            held, self._held = self._held, []
        for link in links:
            link.close()
        for s in held:
            _close(s)

    def close(self) -> None:
        self._running = False
        _close(self._sock)
        self.heal()


@contextlib.contextmanager
def pg_proxy(url: str) -> Iterator[PgProxy]:
    port = urlsplit(url.replace("postgresql+psycopg://", "postgresql://")).port or 5432
    proxy = PgProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()
