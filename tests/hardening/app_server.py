"""A real wgnest HTTP server for the hardening suite: `serve()` on 127.0.0.1 serving a fixed
body, in a process of its own (its own GIL and descriptors, and a runaway bcrypt dies with it).

    python app_server.py [--web-config FILE] [--body-bytes N] [--set NAME=VALUE ...]

Prints the port on one line, serves until its stdin closes (the test ends or dies), then
shuts down. --set overrides a constant of wgnest.runtime.web (a timeout, a cap).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wgnest.runtime import web
from wgnest.runtime.webconfig import load_web_config


class _App:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def metrics(self) -> bytes:
        return self.body

    def status_page(self) -> str:
        return "<html><body>hardening</body></html>"


def _body(size: int) -> bytes:
    line = b'wgnest_hardening_sample{device="wg0",peer="%06d"} 1\n'
    lines, total, i = [], 0, 0
    while total < size:
        lines.append(line % i)
        total += len(lines[-1])
        i += 1
    return b"".join(lines)[:size]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--web-config", type=Path)
    p.add_argument("--body-bytes", type=int, default=20_000)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for item in args.set:
        name, _, value = item.partition("=")
        setattr(web, name, float(value) if "." in value else int(value))
    cfg = load_web_config(args.web_config) if args.web_config else None
    server = web.serve("127.0.0.1:0", _App(_body(args.body_bytes)), "/metrics", cfg)
    print(server.port, flush=True)
    try:
        sys.stdin.read()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
