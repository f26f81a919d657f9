"""The agent's Prometheus endpoint: GET /metrics over HTTP, where `prometheus_listen` says.

Off unless configured (the builder module's `prometheus` options). One
request at a time, each with a deadline, on a thread of its own: a scrape
every few seconds is all it has to serve, and a client that stalls holds it
for at most REQUEST_TIMEOUT. Every client's name is in the counters' labels:
whoever reaches the port reads them (the module opens no firewall port unless
asked).
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable

REQUEST_TIMEOUT = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/metrics":
            try:
                body, status, kind = self.server.render().encode(), 200, CONTENT_TYPE
            except Exception as e:  # a scrape that fails says so; the agent goes on
                body, status, kind = f"nixfarm: metrics failed: {e}\n".encode(), 500, "text/plain"
        elif self.path == "/":
            body, status, kind = b"nixfarm agent: metrics at /metrics\n", 200, "text/plain"
        else:
            body, status, kind = b"not found: metrics are at /metrics\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not news


class _Server(http.server.HTTPServer):
    def __init__(self, address: tuple[str, int], render: Callable[[], str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.render = render
        super().__init__(address, _Handler)


class Exporter:
    """Serves `render()` at /metrics on (host, port) until `close()`."""

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        self._server = _Server((host, port), render)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="exporter", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
