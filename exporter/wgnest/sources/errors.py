"""The one error type sources raise, with a small fixed set of reasons (a metric label)."""

from __future__ import annotations

import errno as errno_mod
import sys

from wgnest.model.failures import REASONS, SourceFailure


class SourceError(Exception):
    """A source could not be read. `reason` is one of REASONS; the message names the input."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason if reason in REASONS else "other"

    def failure(self, collector: str) -> SourceFailure:
        return SourceFailure(collector, self.reason, " ".join(str(self).split()))


def reason_for_errno(code: int | None) -> str:
    if code in (errno_mod.EPERM, errno_mod.EACCES):
        return "eperm"
    if code in (errno_mod.ENODEV, errno_mod.ENOENT, errno_mod.ENXIO):
        return "enodev"
    if code == errno_mod.ECONNREFUSED:
        return "refused"
    if code in (errno_mod.ETIMEDOUT, errno_mod.EAGAIN):
        return "timeout"
    return "errno"


def netlink_errors() -> tuple[type[Exception], ...]:
    """What a netlink read may raise: OSError, and pyroute2's NetlinkError once pyroute2 is
    loaded (it is imported only where it runs: a process that never loaded it cannot get
    one)."""
    loaded = sys.modules.get("pyroute2.netlink.exceptions")
    return (OSError,) if loaded is None else (OSError, loaded.NetlinkError)
