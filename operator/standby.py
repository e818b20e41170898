"""/healthz for a replica that waits for the leader Lease.

kopf's liveness endpoint starts with kopf, and kopf starts only once this replica leads. A
standby must still answer its probes (or the kubelet restarts it forever), so until then this
small server answers on the same port, and stops just before kopf binds it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StandbyHealth:
    def __init__(self, port: int, lease: str, host: str = "0.0.0.0") -> None:
        body = json.dumps({"leader": False, "standby": True, "lease": lease}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/healthz":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:  # probes every few seconds: keep the log quiet
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="standby-health", daemon=True)

    def __enter__(self) -> StandbyHealth:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()  # frees the port for kopf's own endpoint
        self._thread.join(5)
