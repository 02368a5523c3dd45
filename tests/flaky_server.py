"""A real HTTP server on 127.0.0.1 that serves a folder of shards badly, on purpose (the flaky-server tests).

    python tests/flaky_server.py FOLDER PLAN.json PORT_FILE

`PLAN.json` maps a file name to what its successive requests get: "ok", "503" (Service Unavailable), "drop:N"
(the headers promise the whole file, N bytes are sent, then the connection is closed), "stall:N:S" (N bytes,
then S seconds of silence, then the connection is closed); requests past the plan's end are "ok". Range
requests (`bytes=START-`) are answered with 206, as object stores and web servers do. The port it listens on is
written to PORT_FILE once it is ready; every request is appended to FOLDER/requests.log.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FOLDER, PLAN = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
SEEN: dict[str, int] = defaultdict(int)
LOCK = threading.Lock()


class FlakyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        with LOCK:
            plan = PLAN.get(name, [])
            action = plan[SEEN[name]] if SEEN[name] < len(plan) else "ok"
            SEEN[name] += 1
            with open(FOLDER / "requests.log", "a") as log:
                log.write(f"{name} {self.headers.get('Range', '-')} {action}\n")
        path = FOLDER / name
        if not path.is_file():
            self.send_error(404)
            return
        if action == "503":
            self.send_error(503, "Service Unavailable")
            return
        data = path.read_bytes()
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[len("bytes=") : -1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        kind, _, rest = action.partition(":")
        if kind in ("drop", "stall"):
            count = int(rest.split(":")[0])
            self.wfile.write(body[:count])
            self.wfile.flush()
            if kind == "stall":
                time.sleep(float(rest.split(":")[1]))
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # requests.log has them
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.daemon_threads = True
    Path(sys.argv[3]).write_text(str(server.server_address[1]))
    server.serve_forever()
