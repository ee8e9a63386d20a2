"""`wgnest serve`: placeholder until the exporter lands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_serve_arguments(p: argparse.ArgumentParser,
                        common: Callable[[argparse.ArgumentParser], None]) -> None:
    common(p)


def run_serve(args: argparse.Namespace) -> int:
    raise NotImplementedError("serve")
