"""Imports that load less than they would by themselves (what serve's resident memory is
made of first: the imports, before any peer)."""

from __future__ import annotations

import sys


def import_asyncio_without_ssl() -> None:
    """asyncio imports ssl, and OpenSSL with it (~2.5 MiB resident), for the TLS it would do
    itself; icmplib imports asyncio for its async API, which wgnest does not use, and the
    web server does its own TLS over memory BIOs, importing ssl only when a web config asks
    for TLS. So asyncio is imported with ssl hidden (its modules then hold ssl = None,
    which they allow), unless ssl or asyncio is loaded already."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # (an ImportError on import)
    try:
        import asyncio  # noqa: F401
    except ImportError:  # an asyncio that needs ssl: imported again, as it is
        for name in [m for m in sys.modules if m == "asyncio" or m.startswith("asyncio.")]:
            del sys.modules[name]
    finally:
        del sys.modules["ssl"]
