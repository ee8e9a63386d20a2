"""Kernel WireGuard devices through pyroute2's generic netlink (WG_CMD_GET_DEVICE).

pyroute2 returns the dump's messages unmerged: a large device spans several messages and
one peer can span two (the continuation repeats only its public key and more allowed IPs).
pyroute2 also decodes the private and preshared keys; they are never read here.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from wgnest.model.host import Device, Endpoint, Link
from wgnest.sources.errors import SourceError, netlink_errors, reason_for_errno
from wgnest.sources.peer_builder import PeerBuilder, lean_network

log = logging.getLogger(__name__)
DUMP_RETRIES = 3
NLM_F_DUMP_INTR = 0x10


def _key(value: Any) -> str:
    if isinstance(value, dict):  # pyroute2 nla objects are dicts; 'value' holds base64
        value = value.get("value", "")
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _endpoint(raw: Any) -> Endpoint | None:
    if not raw or not raw.get("addr"):
        return None
    address = ipaddress.ip_address(raw["addr"])
    scope = int(raw.get("scope_id") or 0)
    if address.version == 6 and scope and sys.byteorder == "little":
        # pyroute2 decodes sin6_scope_id big-endian; the kernel sends it in host order.
        scope = int.from_bytes(scope.to_bytes(4, "big"), "little")
    if address.is_unspecified and not raw.get("port"):
        return None
    return Endpoint(address, int(raw["port"]), scope)


def merge_dump(messages: Iterable[Any], link: Link) -> Device:
    """Merge the messages of one WG_CMD_GET_DEVICE dump into one Device (peers once each)."""
    public_key, listen_port, fwmark = "", 0, 0
    peers: dict[str, PeerBuilder] = {}
    for msg in messages:
        public_key = _key(msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) or public_key
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for raw in msg.get_attr("WGDEVICE_A_PEERS") or ():
            pub = _key(raw.get_attr("WGPEER_A_PUBLIC_KEY"))
            parts = peers.get(pub) or peers.setdefault(pub, PeerBuilder(pub))
            if (ep := raw.get_attr("WGPEER_A_ENDPOINT")) is not None:
                parts.endpoint = _endpoint(ep)
            if (hs := raw.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None:
                parts.handshake_sec, parts.handshake_nsec = hs["tv_sec"], hs["tv_nsec"]
            parts.rx_bytes = raw.get_attr("WGPEER_A_RX_BYTES") or parts.rx_bytes
            parts.tx_bytes = raw.get_attr("WGPEER_A_TX_BYTES") or parts.tx_bytes
            ka = raw.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            parts.keepalive = ka or parts.keepalive
            for aip in raw.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                parts.allowed_ips.append(lean_network(ipaddress.ip_network(aip["addr"],
                                                                           strict=False)))
    return Device(
        name=link.name, ifindex=link.index, implementation="kernel", public_key=public_key,
        listen_port=int(listen_port), fwmark=int(fwmark), mtu=link.mtu,
        peers=tuple(p.build() for p in peers.values()),
    )


def preload_kernel_wireguard(module: Path = Path("/sys/module/wireguard")) -> bool:
    """Import pyroute2's WireGuard now if this kernel has WireGuard (its module is loaded
    or built in): True if so. Importing it takes a while (a slow machine: seconds), which
    must not come out of the first read's deadline; a kernel without it never loads it."""
    if not module.is_dir():
        return False
    from pyroute2 import WireGuard  # noqa: F401

    return True


def open_wireguard() -> Any:
    from pyroute2 import WireGuard  # (loaded only on a host with a kernel WireGuard device)

    return WireGuard()


def kernel_devices(
    links: Sequence[Link], open_wg: Callable[[], Any] = open_wireguard
) -> tuple[list[Device], list[SourceError]]:
    """Read every link of kind `wireguard`. Returns (devices, one error per unreadable one)."""
    wg_links = [link for link in links if link.kind == "wireguard"]
    if not wg_links:
        return [], []
    try:
        wg = open_wg()
    except netlink_errors() as exc:  # no genl family 'wireguard', or no permission
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        raise SourceError(f"wireguard generic netlink unavailable: {exc}",
                          reason_for_errno(code)) from None
    devices: list[Device] = []
    errors: list[SourceError] = []
    try:
        for link in wg_links:
            try:
                devices.append(_read_one(wg, link))
            except SourceError as exc:
                errors.append(exc)
    finally:
        wg.close()
    return devices, errors


def _interrupted(messages: Sequence[Any]) -> bool:
    """NLM_F_DUMP_INTR: the device changed while the kernel was dumping it, so the messages
    mix two states. pyroute2 passes the flag through on each message but never raises
    NetlinkDumpInterrupted for it."""
    return any(int(m["header"].get("flags", 0)) & NLM_F_DUMP_INTR for m in messages)


def _read_one(wg: Any, link: Link) -> Device:
    errors = netlink_errors()
    loaded = sys.modules.get("pyroute2.netlink.exceptions")
    interrupted: tuple[type[Exception], ...] = (
        (loaded.NetlinkDumpInterrupted,) if loaded is not None else ())
    for _attempt in range(DUMP_RETRIES):
        try:
            messages = list(wg.info(link.name))
            if _interrupted(messages):
                continue
            return merge_dump(messages, link)
        except interrupted:
            continue
        except errors as exc:
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            raise SourceError(f"device {link.name}: {exc}", reason_for_errno(code)) from None
    raise SourceError(f"device {link.name}: dump changed {DUMP_RETRIES} times while read",
                      "dump_intr")
