"""The exposition kept as gzip pieces: concatenated pieces are one valid gzip member (read
by GNU gzip, which checks the CRC and length), and a render recompresses only the blocks of
peers and paths that changed."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import ipaddress
import shutil
import subprocess
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgnest.analysis.paths import diagnose
from wgnest.model.host import Device, Endpoint, Peer, Snapshot
from wgnest.surfaces import gzipped
from wgnest.surfaces.exposition import exposition
from wgnest.surfaces.gzipped import Deflater, gzip_of, inflate, text_of
from wgnest.surfaces.metrics import (
    LineCache,
    _cut,
    path_families,
    wireguard_families,
    wireguard_pieces,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=12))
def test_pieces_join_into_one_gzip_member(texts: list[bytes]) -> None:
    d = Deflater()
    pieces = [d.piece(t) for t in texts]
    member = gzip_of(pieces)
    assert gzip.decompress(member) == b"".join(texts)
    assert inflate(member) == text_of(pieces) == b"".join(texts)


def test_gnu_gzip_reads_it_and_checks_its_crc(tmp_path: pytest.TempPathFactory) -> None:
    gz = shutil.which("gzip")
    assert gz, "gzip (Debian's gzip package) is needed"
    d = Deflater()
    texts = [b"# HELP x y\n", b"x 1.0\n" * 20000, b"", bytes(range(256)) * 300]
    member = gzip_of([d.piece(t) for t in texts])
    out = subprocess.run([gz, "-dc"], input=member, capture_output=True, check=True)
    assert out.stdout == b"".join(texts)
    bad = member[:-8] + (zlib.crc32(b"other") ^ 1).to_bytes(4, "little") + member[-4:]
    assert subprocess.run([gz, "-t"], input=bad, capture_output=True).returncode != 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc_combine_without_libz_is_zlibs(a: bytes, b: bytes) -> None:
    want = zlib.crc32(a + b)
    assert gzipped.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == want
    saved, gzipped._COMBINE = gzipped._COMBINE, None
    try:
        assert gzipped.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == want
    finally:
        gzipped._COMBINE = saved


def _key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def _peer(i: int, rx: int = 0) -> Peer:
    return Peer(_key(i), Endpoint(ipaddress.ip_address(f"198.18.{i >> 8}.{i & 255}"), 51820),
                (ipaddress.ip_network(f"10.0.{i >> 8}.{i & 255}/32"),),
                1_700_000_000.0 if i % 3 else 0.0, rx, 0, 0)


def _snap(peers: tuple[Peer, ...], at: float = 1_700_000_100.0) -> Snapshot:
    return Snapshot(at, devices=(Device("wg0", 3, "userspace", _key(0), 51820, 0, 1420, peers),))


def test_only_changed_blocks_are_compressed_again() -> None:
    peers = tuple(_peer(i) for i in range(1, 1001))
    snap = _snap(peers)
    paths = diagnose(snap)
    cache = LineCache()
    names = {peers[5].public_key: "five"}
    first = wireguard_pieces(snap, paths, names, cache)
    assert text_of(first) == exposition(wireguard_families(snap, paths, names))
    blocks = dict(cache.peers)
    assert 2 < len(blocks) < 60  # about BLOCK_CUT peers each
    # unchanged: every piece is the one made before, but the handshake ages (a new time)
    again = _snap(peers, 1_700_000_105.0)
    second = wireguard_pieces(again, paths, names, cache)
    assert text_of(second) == exposition(wireguard_families(again, paths, names))
    kept = {id(p) for p in first}
    assert sum(id(p) not in kept for p in second) == 2  # the device families, the ages
    # one peer's counter moved: its block's counters only
    moved = list(peers)
    moved[500] = dataclasses.replace(peers[500], rx_bytes=123456)
    third_snap = _snap(tuple(moved), 1_700_000_110.0)
    third = wireguard_pieces(third_snap, paths, names, cache)
    assert text_of(third) == exposition(wireguard_families(third_snap, paths, names))
    assert sum(id(p) not in kept for p in third) == 2 + 3  # rx, tx, last handshake
    # one peer added: one block changes (the others keep their pieces: blocks are cut by key)
    # (a key that starts no block of its own, whatever this process' hash seed)
    new = next(i for i in range(5000, 6000) if not _cut(_peer(i).public_key))
    added = (*moved[:300], _peer(new), *moved[300:])
    fourth_snap = _snap(added, 1_700_000_115.0)
    new_path = next(p for p in diagnose(fourth_snap) if p.public_key == _key(new))
    fourth_paths = [*paths[:300], new_path, *paths[300:]]  # the others kept, as diagnose does
    kept = {id(p) for p in third}
    fourth = wireguard_pieces(fourth_snap, fourth_paths, names, cache)
    assert text_of(fourth) == exposition(wireguard_families(fourth_snap, fourth_paths, names))
    changed_peer_blocks = [b for k, b in cache.peers.items()
                           if k not in blocks or b.pieces[0] is not blocks[k].pieces[0]]
    assert len(changed_peer_blocks) == 1
    # per family, one new piece for the peer's block and one for its path's (and the ages)
    path_families_n = len(list(path_families(())))
    assert len(fourth) - sum(id(p) in kept for p in fourth) == 2 + 5 + path_families_n


def test_a_small_text_is_compressed_whole() -> None:
    """A client's few tunnels: the pieces compressed again as one (they compress apart:
    each without the others' context); a gateway's text stays in its pieces."""
    d = Deflater()
    lines = [f"# HELP wireguard_peer_{i} Something about peers.\n# TYPE wireguard_peer_{i} "
             f'gauge\nwireguard_peer_{i}{{device="wg0"}} 1.0\n'.encode() for i in range(60)]
    pieces = [d.piece(t) for t in lines]
    small = gzipped.member_of(pieces, d)
    assert inflate(small) == b"".join(lines)
    assert len(small) < len(gzip_of(pieces)) / 2
    big = [d.piece(t * 40) for t in lines]  # 60 pieces of 4 KB: above WHOLE_BELOW
    assert sum(p.size for p in big) >= gzipped.WHOLE_BELOW
    assert gzipped.member_of(big, d) == gzip_of(big)


def test_labels_that_need_escaping_are_written_as_the_families_write_them() -> None:
    """The fast (device, public_key) format is used only where no label needs escaping: a
    device name or a key with a quote, a backslash or a newline goes through line()."""
    peers = (_peer(1), dataclasses.replace(_peer(2), public_key='k"2\\'), _peer(3))
    for device in ("wg0", 'w"g\\0', "wg\n%s"):
        snap = dataclasses.replace(_snap(peers), devices=(
            dataclasses.replace(_snap(peers).devices[0], name=device),))
        paths = diagnose(snap)
        got = text_of(wireguard_pieces(snap, paths, {}, LineCache()))
        assert got == exposition(wireguard_families(snap, paths, {}))
        assert b'public_key="k\\"2\\\\"' in got
