"""Loopback proxies that fault a real connection: to PostgreSQL (``spotrun.faultproxy``),
and to an HTTP object store (slow deletes). The code under test connects to the proxy as it
would to the real server."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from urllib.parse import urlsplit

from spotrun.faultproxy import PgProxy, pg_proxy

__all__ = ["PgProxy", "SlowDeletes", "pg_proxy"]


class SlowDeletes:
    """An HTTP proxy in front of an object store that answers every delete (DELETE, and
    S3's batch ``POST ?delete``) only after ``delay`` seconds; other requests pass."""

    def __init__(self, target: str, delay: float) -> None:
        self.target = urlsplit(target)
        self.delay = delay
        self.deletes = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if self.command == "DELETE" or (self.command == "POST"
                                                and "delete" in self.path.split("?", 1)[-1]):
                    proxy.deletes += 1
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port,
                                                  timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
