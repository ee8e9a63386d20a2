"""What went wrong while reading: one structured failure per source and subject."""

from __future__ import annotations

from dataclasses import dataclass

# The fixed set of failure reasons (a metric label): every source and the prober use these.
REASONS = ("timeout", "refused", "parse", "errno", "eperm", "enodev", "dump_intr", "disabled",
           "other")


@dataclass(frozen=True, slots=True)
class SourceFailure:
    """`collector` could not be read (all of it, or the one `subject` the message names)."""

    collector: str
    reason: str  # one of REASONS
    message: str  # one line naming the input; never holds a key
    netns: str = ""  # the network namespace it concerns (--netns other than self)

    def __str__(self) -> str:
        return f"{self.collector} failed ({self.reason}): {self.message}"


def failed_collectors(failures: tuple[SourceFailure, ...]) -> frozenset[str]:
    return frozenset(f.collector for f in failures)
