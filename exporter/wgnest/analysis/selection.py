"""Which devices and peers are reported (--wireguard.interfaces, --wireguard.interfaces-exclude,
--wireguard.peers-exclude). Applied after the diagnosis: a device left out of the report still
counts as the tunnel another one is nested in."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from wgnest.analysis.paths import PeerPath
from wgnest.model.host import Snapshot


@dataclass(frozen=True)
class Reported:
    interfaces: re.Pattern[str] | None = None  # full match; None: all
    interfaces_exclude: re.Pattern[str] | None = None
    peers_exclude: frozenset[str] = frozenset()

    @property
    def everything(self) -> bool:
        return self.interfaces is None and self.interfaces_exclude is None and \
            not self.peers_exclude

    def device(self, name: str) -> bool:
        return ((self.interfaces is None or self.interfaces.fullmatch(name) is not None)
                and (self.interfaces_exclude is None
                     or self.interfaces_exclude.fullmatch(name) is None))


EVERYTHING = Reported()


def reported(snap: Snapshot, paths: Sequence[PeerPath], only: Reported
             ) -> tuple[Snapshot, list[PeerPath]]:
    """The snapshot and paths with only the devices and peers to report."""
    if only.everything:
        return snap, list(paths)
    devices = tuple(
        dataclasses.replace(d, peers=tuple(p for p in d.peers
                                           if p.public_key not in only.peers_exclude))
        for d in snap.devices if only.device(d.name))
    kept = {d.name for d in devices}
    return (dataclasses.replace(snap, devices=devices),
            [p for p in paths if p.device in kept and p.public_key not in only.peers_exclude])
