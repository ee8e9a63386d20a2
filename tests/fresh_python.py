"""Run code in a fresh interpreter with this one's module path: for tests of what a process
imports, or of logging set up from scratch."""

from __future__ import annotations

import os
import subprocess
import sys


def run_fresh(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
