#!/usr/bin/env python3
"""Fixture HTTP server for the bats tests (stdlib only, 127.0.0.1 only).

Usage:
  python3 http_server.py --root DIR --port-file FILE [--log FILE]
                         [--cut-after BYTES] [--ignore-range]

Serves files from DIR on an ephemeral port and writes that port to FILE once
bound. The query string is ignored. `Range: bytes=N-` gets 206 with
Content-Range (416 when N >= size); missing files get 404.

--cut-after BYTES  the FIRST GET of each file announces the full
                   Content-Length but sends only BYTES bytes of body, then
                   closes the connection (a cut transfer); later requests are
                   served normally.
--ignore-range     answer every GET with 200 and the whole file, as a server
                   without range support does.
--log FILE         one line per request: METHOD PATH?QUERY range=HEADER
                   status=CODE (stderr when not given).
"""

import argparse
import os
import re
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

RANGE_RE = re.compile(r"^bytes=(\d+)-$")


class Handler(BaseHTTPRequestHandler):
    server_version = "jawiki-fixture/1"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # quiet: requests are logged by _log in a fixed format

    def _log(self, status):
        line = "%s %s range=%s status=%d\n" % (
            self.command,
            self.path,
            self.headers.get("Range", "-"),
            status,
        )
        with self.server.log_lock:
            self.server.log.write(line)
            self.server.log.flush()

    def _resolve(self):
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        full = os.path.realpath(os.path.join(self.server.root, rel))
        if not full.startswith(self.server.root + os.sep) or not os.path.isfile(full):
            return None
        return full

    def _error(self, status, send_body, headers=()):
        # A small HTML body, as real servers send: clients must not keep it.
        body = b"<html><body>%d</body></html>\n" % status
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._log(status)
        if send_body:
            self.wfile.write(body)

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _serve(self, send_body):
        path = self._resolve()
        if path is None:
            self._error(404, send_body)
            return
        with open(path, "rb") as fh:
            data = fh.read()
        size = len(data)
        start = 0
        status = 200
        match = RANGE_RE.match(self.headers.get("Range", ""))
        if match and not self.server.ignore_range:
            start = int(match.group(1))
            if start >= size:
                self._error(416, send_body, [("Content-Range", "bytes */%d" % size)])
                return
            status = 206
        body = data[start:]
        cut = None
        if send_body and self.server.cut_after is not None:
            with self.server.log_lock:
                if path not in self.server.cut_done:
                    self.server.cut_done.add(path)
                    cut = self.server.cut_after
        self.send_response(status)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Accept-Ranges", "none" if self.server.ignore_range else "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, size - 1, size))
        self.end_headers()
        self._log(status)
        if not send_body:
            return
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])
        self.wfile.flush()
        # Close short of the announced Content-Length: the client sees the link
        # drop mid-body. A FIN, not a reset, so the bytes sent are surely kept.
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log")
    parser.add_argument("--cut-after", type=int)
    parser.add_argument("--ignore-range", action="store_true")
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.root = os.path.realpath(args.root)
    server.cut_after = args.cut_after
    server.cut_done = set()
    server.ignore_range = args.ignore_range
    server.log = open(args.log, "a", encoding="utf-8") if args.log else sys.stderr
    server.log_lock = threading.Lock()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    tmp = args.port_file + ".tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write("%d\n" % server.server_address[1])
    os.replace(tmp, args.port_file)  # readers never see a half-written port
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
