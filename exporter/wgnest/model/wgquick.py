"""A wg-quick config as `wg-quick up` reads it: only what routing depends on. The private
and preshared keys are never read into these classes. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from wgnest.model.host import Endpoint, IPNetwork

IPInterface = tuple[str, int]  # (address text, prefix length), as `ip address add` takes it


@dataclass(frozen=True, slots=True)
class ConfigPeer:
    public_key: str
    endpoint: Endpoint | None  # resolved as wg(8) resolves it; None: no Endpoint line
    endpoint_text: str  # as written ("" when none); a host name stays a name here
    allowed_ips: tuple[IPNetwork, ...]
    persistent_keepalive: int = 0


@dataclass(frozen=True, slots=True)
class Hook:
    phase: str  # PreUp, PostUp, PreDown, PostDown
    command: str  # as written; %i is expanded when it is evaluated
    line: int


@dataclass(frozen=True, slots=True)
class WgQuickConfig:
    name: str  # the interface name: the file name without .conf
    path: str
    addresses: tuple[IPInterface, ...] = ()
    mtu: int = 0  # 0: wg-quick computes it
    table: str = ""  # as written: "" and "auto" (policy table for /0), "off", a number or name
    table_id: int = 0  # a custom Table resolved to its number; 0 for auto/off/unknown name
    fwmark: int = 0  # 0: none ("off")
    listen_port: int = 0  # 0: random
    hooks: tuple[Hook, ...] = ()
    dns: tuple[str, ...] = ()
    save_config: bool = False
    peers: tuple[ConfigPeer, ...] = ()
    problems: tuple[str, ...] = ()  # lines wg setconf or wg-quick would refuse (never quoted)

    @property
    def auto_table(self) -> bool:
        return self.table in ("", "auto")


@dataclass(frozen=True, slots=True)
class ConfigFailure:
    """A config `wgnest lint` could not read (missing, unreadable, not an interface name)."""

    path: str
    message: str  # one line; never quotes the file's content
