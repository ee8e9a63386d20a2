from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from tests.lab.lab import Lab, built, missing_prerequisites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = missing_prerequisites()
    if not why or os.environ.get("CI"):
        return  # on CI a lab test never skips: it runs, and fails if the lab cannot be built
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """A Refresher freezes what it keeps (gc.freeze, as serve wants it): no test leaves
    objects out of the cyclic GC for the tests after it."""
    yield
    gc.unfreeze()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A router, a client and two wireguard-go servers; removed afterwards, always."""
    with built(Lab()) as made:
        yield made
