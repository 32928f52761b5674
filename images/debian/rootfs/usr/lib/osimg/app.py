"""The demo application of the Debian family: an HTTP counter on port 8080.

The counter lives on the data volume (/data/app/counter), so it survives any swap. Next to it the
server keeps state only in its memory: when it started, how many requests it served, and its PID
(inside its own PID namespace). That part survives a swap only if the process itself is carried
across it (CRIU checkpoint on the old OS, restore on the new one): a restarted server reports a new
start time and starts counting from zero. Each answer reads /etc/osimg-version afresh, so a carried
server shows the OS it runs on now.

Answer: "COUNTER VERSION pid=PID started=EPOCH served=N" (the first two fields are what the tiny
family's CGI answers too).
"""

import http.server
import os
import signal
import sys
import threading
import time

COUNTER = "/data/app/counter"
STARTED = time.time()
served = 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
        global served
        if self.path != "/cgi-bin/counter":
            self.send_error(404)
            return
        with lock:
            try:
                with open(COUNTER) as f:
                    n = int(f.read().strip() or 0)
            except (FileNotFoundError, ValueError):
                n = 0
            n += 1
            with open(COUNTER + ".tmp", "w") as f:
                f.write(f"{n}\n")
            os.replace(COUNTER + ".tmp", COUNTER)
            served += 1
            mine = served
        try:
            with open("/etc/osimg-version") as f:
                version = f.read().strip()
        except OSError:
            version = "?"
        body = f"{n} {version} pid={os.getpid()} started={STARTED:.6f} served={mine}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    # its own session: a checkpoint holds the whole tree (CRIU refuses a tree whose session leader
    # is outside it); as PID 1 of its namespace it would ignore SIGTERM without a handler
    os.setsid()
    os.chdir("/")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.makedirs(os.path.dirname(COUNTER), exist_ok=True)
    Server(("0.0.0.0", 8080), Handler).serve_forever()


if __name__ == "__main__":
    main()
