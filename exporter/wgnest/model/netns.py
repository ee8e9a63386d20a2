"""A host seen through several network namespaces: one Snapshot per namespace, and where the
transport of each device is really routed. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from wgnest.model.failures import SourceFailure
from wgnest.model.host import Device, Snapshot


@dataclass(frozen=True, slots=True)
class Guest:
    """A kernel device of namespace `netns` whose UDP socket lives in another namespace (it
    was made there and moved, https://www.wireguard.com/netns/): that namespace routes its
    transport, and holds the route lookups of its flows."""

    netns: str  # where the device is
    device: Device


@dataclass(frozen=True, slots=True)
class NetnsSnapshot:
    name: str  # the netns label: /run/netns name, "host", a container's hostname, a comm
    snapshot: Snapshot
    path: str = ""  # what was opened: /run/netns/NAME, /proc/PID/ns/net; "" for our own
    reported: bool = True  # selected (--netns); False: read only as a guest's routing home
    enter: str = ""  # how a command is run there: "ip netns exec NAME", "nsenter -t PID -n"
    guests: tuple[Guest, ...] = ()
    # local addresses (ifindex, address text) of this namespace: a transport whose next hop
    # is one of them is forwarded by this namespace's routing
    addresses: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Moved:
    """Where the socket of a moved kernel device was looked for, and what was found."""

    netns: str  # the device's namespace
    device: str
    birth: str = ""  # the namespace holding its socket; "" when not found
    error: str = ""  # why it was not found (one line)


@dataclass(frozen=True)
class HostSnapshot:
    taken_at: float
    namespaces: tuple[NetnsSnapshot, ...]
    labelled: bool = False  # --netns other than self: every series carries `netns`
    moved: tuple[Moved, ...] = ()
    failures: tuple[SourceFailure, ...] = ()  # namespaces that could not be found or read
    durations: dict[str, float] = field(default_factory=dict)

    def reported(self) -> tuple[NetnsSnapshot, ...]:
        return tuple(ns for ns in self.namespaces if ns.reported)

    def by_name(self) -> dict[str, NetnsSnapshot]:
        return {ns.name: ns for ns in self.namespaces}


def single(snap: Snapshot) -> HostSnapshot:
    """The host as one namespace (--netns self with nothing moved)."""
    return HostSnapshot(snap.taken_at, (NetnsSnapshot("", snap),))
