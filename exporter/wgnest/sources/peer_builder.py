"""A peer as a source reads it: field by field, over several messages or lines."""

from __future__ import annotations

from dataclasses import dataclass, field

from wgnest.model.host import Endpoint, IPNetwork, Peer


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
