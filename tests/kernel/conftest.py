"""tests/kernel/ runs only inside the kernel stage's guest (tests/kernel/stage.py sets
WGNEST_KERNEL_GUEST=1 there): on the host these tests are not even collected, since the host
has no WireGuard module. `make kernel-test` boots the guest and runs them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.kernel.klab import KernelLab

IN_GUEST = os.environ.get("WGNEST_KERNEL_GUEST") == "1"
collect_ignore_glob = [] if IN_GUEST else ["test_*.py"]


@pytest.fixture
def make_klab() -> Iterator[Callable[[int], KernelLab]]:
    """Build a KernelLab with N kernel WireGuard servers; every lab built is removed after
    the test, always."""
    built: list[KernelLab] = []

    def make(servers: int = 2) -> KernelLab:
        lab = KernelLab()
        built.append(lab)
        try:
            return lab.build(servers)
        except subprocess.CalledProcessError as exc:
            raise AssertionError(f"{exc.cmd}: {exc.stderr}") from None

    try:
        yield make
    finally:
        for lab in built:
            lab.close()


@pytest.fixture
def klab(make_klab: Callable[[int], KernelLab]) -> KernelLab:
    """A router, a client and two kernel WireGuard servers."""
    return make_klab(2)
