"""A plain HTTP file server with faults, run as a process by tests/test_remote_corpus.py.

    python tests/fault_http_server.py FOLDER [--drop N] [--forbid PREFIX] [--log FILE]

Serves FOLDER on a free port of 127.0.0.1 and prints the port on its first line. ``--drop N``: the first
N GET requests of each ``.tar`` file send the full Content-Length but only half the body, then close
the connection (a connection lost mid-shard). ``--forbid PREFIX``: paths under PREFIX answer 403. Every
GET is appended to ``--log`` as one line (its path), so a test can count the retries.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--drop", type=int, default=0)
    ap.add_argument("--forbid", default=None)
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    seen: dict[str, int] = {}
    lock = threading.Lock()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if args.log:
                with lock, open(args.log, "a") as f:
                    f.write(path + "\n")
            if args.forbid and path.startswith(args.forbid):
                self.send_error(403, "forbidden")
                return
            with lock:
                seen[path] = seen.get(path, 0) + 1
                count = seen[path]
            file = os.path.join(args.folder, path.lstrip("/"))
            if path.endswith(".tar") and count <= args.drop and os.path.isfile(file):
                data = open(file, "rb").read()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=args.folder))
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
