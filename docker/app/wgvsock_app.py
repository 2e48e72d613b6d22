#!/usr/bin/env python3
"""wgvsock-app: the example enclave app, egress and ingress through the tunnel in one page.

Installed in the image as /usr/local/bin/wgvsock-app. It runs inside the enclave as the CMD
of `wgvsock enclave up ... -- /usr/local/bin/wgvsock-app`, so the tunnel is already up when it
starts. Every `GET /` fetches FETCH_URL (an outside URL, reached through wg0 and the parent's
NAT: egress) and serves what came back to whoever asked (reaching it through the parent's
ingress port: ingress). Python standard library only.

Environment:
  FETCH_URL   what to fetch                       (default https://checkip.amazonaws.com/)
  APP_PORT    TCP port to serve on                (default 443: the example profile forwards
                                                   the parent's port 8443 to it)
  APP_BIND    address to serve on                 (default 0.0.0.0)
  FETCH_TIMEOUT  seconds per fetch                (default 10)

  GET /         fetch FETCH_URL now; 200 with a one-line summary and the body, or 502 and why
  GET /healthz  200 "ok" without fetching anything
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FETCH_URL = os.environ.get("FETCH_URL") or "https://checkip.amazonaws.com/"
PORT = int(os.environ.get("APP_PORT") or 443)
BIND = os.environ.get("APP_BIND") or "0.0.0.0"  # noqa: S104 - the tunnel address is the point
TIMEOUT = float(os.environ.get("FETCH_TIMEOUT") or 10)
MAX_BODY = 1 << 20


def fetch(url: str = FETCH_URL) -> tuple[bool, str, bytes]:
    """(ok, one-line summary, body) of a GET on URL."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:  # noqa: S310 - URL is ours
            body = resp.read(MAX_BODY)
            status = f"{resp.status} {resp.reason}"
    except urllib.error.HTTPError as e:
        body, status = e.read(MAX_BODY), f"{e.code} {e.reason}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return False, f"GET {url} failed: {reason}", b""
    ms = (time.monotonic() - started) * 1000
    return True, f"GET {url} -> {status} ({len(body)} bytes, {ms:.0f} ms)", body


class Handler(BaseHTTPRequestHandler):
    server_version = "wgvsock-app/1"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, b"ok\n")
            return
        if self.path not in ("/", "/index.html"):
            self.reply(404, b"not found: try / or /healthz\n")
            return
        ok, summary, body = fetch()
        log(summary)
        self.reply(200 if ok else 502, f"wgvsock-app: {summary}\n\n".encode() + body)

    def reply(self, code: int, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        log(f"{self.address_string()} {format % args}")


def log(message: str) -> None:
    print(f"wgvsock-app: {message}", flush=True)


def main() -> int:
    server = ThreadingHTTPServer((BIND, PORT), Handler)
    server.daemon_threads = True

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log(f"serving on {BIND}:{PORT}; GET / fetches {FETCH_URL}")
    # One fetch at start-up, so the enclave's console shows at once whether egress works; in a
    # thread, so a slow or failing fetch does not hold the server back.
    threading.Thread(target=lambda: log(fetch()[1]), name="first-fetch", daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopping")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
