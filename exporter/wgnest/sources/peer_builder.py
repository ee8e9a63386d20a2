"""A peer as a source reads it: field by field, over several messages or lines."""

from __future__ import annotations

from dataclasses import dataclass, field

from wgnest.model.host import Endpoint, IPNetwork, Peer


def lean_network(net: IPNetwork) -> IPNetwork:
    """The network without the `hosts` lambda ipaddress gives each /32 and /128 network of
    its own (for hosts() to list the one address), which wgnest never calls: 235 of its
    490 bytes, and most of a road-warrior gateway's allowed IPs are such networks (10,000
    peers: 4.7 MB). Equality, hashing, `in` and str() are unchanged."""
    net.__dict__.pop("hosts", None)
    return net


@dataclass
class PeerBuilder:
    public_key: str
    endpoint: Endpoint | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    handshake_sec: int = 0  # Unix seconds of the last handshake; 0 means never
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    protocol_version: int = 0

    def build(self) -> Peer:
        handshake = self.handshake_sec + self.handshake_nsec / 1e9 if self.handshake_sec else 0.0
        return Peer(self.public_key, self.endpoint, tuple(self.allowed_ips), handshake,
                    self.rx_bytes, self.tx_bytes, self.keepalive)
