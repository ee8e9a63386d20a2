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
from wgnest.surfaces.exposition import Family, exposition
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
    assert sum(id(p) not in kept for p in third) == 2 + 1  # rx (tx and handshakes equal)
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
    (small,) = gzipped.member_of(pieces, d)
    assert inflate(small) == b"".join(lines)
    assert len(small) < len(gzip_of(pieces)) / 2
    big = [d.piece(t * 40) for t in lines]  # 60 pieces of 4 KB: above WHOLE_BELOW
    assert sum(p.size for p in big) >= gzipped.WHOLE_BELOW
    member = gzipped.member_of(big, d)
    assert b"".join(member) == gzip_of(big)
    # in chunks: the pieces' own bytes, not copies, between the header and the trailer
    assert all(c is p.deflated for c, p in zip(member[1:-1], big, strict=True))
    assert inflate(member) == b"".join(t * 40 for t in lines)
    with pytest.raises(zlib.error):
        inflate(member[:-1])  # no trailer: not a whole member


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


def _other(value: object) -> object:
    """Another value of a PeerPath field's kind."""
    from wgnest.analysis.paths import PathVerdict

    if isinstance(value, PathVerdict):
        return PathVerdict.DIRECT if value != PathVerdict.DIRECT else PathVerdict.NESTED
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, "x")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        field = next(f for f in dataclasses.fields(value) if isinstance(
            getattr(value, f.name), int | str) and not isinstance(getattr(value, f.name), bool))
        return dataclasses.replace(value, **{field.name: _other_scalar(getattr(value,
                                                                               field.name))})
    raise AssertionError(f"no other value for {value!r}")


def _other_scalar(value: int | str) -> int | str:
    return value + 1 if isinstance(value, int) else value + "x"


def test_each_family_is_kept_only_when_what_it_is_written_from_is_unchanged() -> None:
    """PATH_INPUTS and PEER_INPUTS name every field their families are written from:
    changing any one field of a path (of every verdict the analysis tests make), or of a
    peer, changes no family's text whose inputs stayed equal."""
    from tests.test_analysis import CASES
    from wgnest.surfaces.exposition import samples_writer
    from wgnest.surfaces.metrics import PATH_INPUTS, PEER_INPUTS, peer_families

    def texts(fams: list[Family]) -> list[str]:
        out = []
        for fam in fams:
            write = samples_writer(fam)
            assert write is not None
            out.append(write(fam.samples))
        return out

    seen = set()
    for _name, build, *_rest in CASES:
        snap = build()
        for path in diagnose(snap):
            seen.add(path.verdict)
            for f in dataclasses.fields(path):
                value = getattr(path, f.name)
                if value is None:
                    continue
                changed = dataclasses.replace(path, **{f.name: _other(value)})
                before, after = texts(list(path_families([path]))), texts(
                    list(path_families([changed])))
                assert len(before) == len(PATH_INPUTS)
                for i, inputs in enumerate(PATH_INPUTS):
                    if before[i] != after[i]:
                        assert inputs(path) != inputs(changed), (f.name, i)
        for d in snap.devices:
            for peer in d.peers:
                for f in dataclasses.fields(peer):
                    value = getattr(peer, f.name)
                    if f.name == "allowed_ips":
                        new = (*value, ipaddress.ip_network("192.0.2.0/24"))
                    elif f.name == "endpoint" and value is not None:
                        new = dataclasses.replace(value, port=value.port + 1)
                    elif isinstance(value, int | float | str) and not isinstance(value, bool):
                        new = value + 1 if not isinstance(value, str) else value + "x"
                    else:
                        continue
                    changed = dataclasses.replace(peer, **{f.name: new})
                    one = dataclasses.replace(snap, devices=(dataclasses.replace(
                        d, peers=(peer,)),))
                    two = dataclasses.replace(snap, devices=(dataclasses.replace(
                        d, peers=(changed,)),))
                    before = texts(list(peer_families(one, {}))[:len(PEER_INPUTS)])
                    after = texts(list(peer_families(two, {}))[:len(PEER_INPUTS)])
                    assert len(before) == len(PEER_INPUTS)
                    for i, inputs in enumerate(PEER_INPUTS):
                        if before[i] != after[i]:
                            assert inputs(peer) != inputs(changed), (f.name, i)
    assert len(seen) >= 4  # direct, nested, loop, unknown at least


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 299), st.sampled_from(
    ["rx", "endpoint", "allowed", "name", "gone", "gateway", "nested"])), max_size=40),
    min_size=1, max_size=5))
def test_any_churn_renders_what_the_families_write(rounds: list[list[tuple[int, str]]]
                                                   ) -> None:
    """Refresh after refresh of counters, endpoints, allowed IPs, names, peers gone and
    paths changed: the pieces always hold exactly exposition(wireguard_families())."""
    from wgnest.analysis.paths import PathVerdict

    peers = {i: _peer(i) for i in range(1, 300)}
    snap = _snap(tuple(peers.values()))
    paths = {p.public_key: p for p in diagnose(snap)}
    names: dict[str, str] = {}
    cache = LineCache()
    at = 1_700_000_100.0
    for changes in [[], *rounds]:
        for i, what in changes:
            p = peers.get(i)
            if p is None:
                peers[i] = p = _peer(i)
            key = p.public_key
            if what == "rx":
                peers[i] = dataclasses.replace(p, rx_bytes=p.rx_bytes + 1000)
            elif what == "endpoint" and p.endpoint is not None:
                peers[i] = dataclasses.replace(p, endpoint=dataclasses.replace(
                    p.endpoint, port=p.endpoint.port + 1))
            elif what == "allowed":
                peers[i] = dataclasses.replace(p, allowed_ips=(
                    *p.allowed_ips, ipaddress.ip_network(f"fd00::{i:x}/128")))
            elif what == "name":
                names[key] = names.get(key, "n") + '"'
            elif what == "gone":
                del peers[i]
            elif what in ("gateway", "nested") and key in paths:
                paths[key] = dataclasses.replace(paths[key], gateway="203.0.113.9") if (
                    what == "gateway") else dataclasses.replace(
                        paths[key], verdict=PathVerdict.NESTED, outer="wg9")
        at += 5
        snap = _snap(tuple(sorted(peers.values(), key=lambda p: p.public_key)), at)
        fresh = {p.public_key: p for p in diagnose(snap)}
        paths = {k: paths.get(k, fresh[k]) for k in fresh}
        ordered = list(paths.values())
        got = text_of(wireguard_pieces(snap, ordered, names, cache))
        assert got == exposition(wireguard_families(snap, ordered, names))


def test_a_moved_endpoint_keeps_its_blocks_allowed_ips_and_nesting_flags() -> None:
    peers = tuple(_peer(i) for i in range(1, 400))
    snap = _snap(peers)
    paths = diagnose(snap)
    cache = LineCache()
    wireguard_pieces(snap, paths, {}, cache)
    before = dict(cache.peers), dict(cache.paths)
    p = peers[200]
    assert p.endpoint is not None
    moved = dataclasses.replace(p, endpoint=dataclasses.replace(p.endpoint, port=1))
    snap2 = _snap((*peers[:200], moved, *peers[201:]), 1_700_000_105.0)
    (i,) = [n for n, q in enumerate(paths) if q.public_key == p.public_key]
    paths2 = [*paths[:i], dataclasses.replace(paths[i], endpoint=str(moved.endpoint)),
              *paths[i + 1:]]
    wireguard_pieces(snap2, paths2, {}, cache)
    (peer_key,) = [k for k, b in cache.peers.items() if b.pieces is not before[0][k].pieces]
    old, new = before[0][peer_key].pieces, cache.peers[peer_key].pieces
    # info lines new; allowed IPs, received, sent and handshakes kept
    assert [a is b for a, b in zip(old, new, strict=True)] == [False, True, True, True, True]
    (path_key,) = [k for k, b in cache.paths.items() if b.pieces is not before[1][k].pieces]
    old, new = before[1][path_key].pieces, cache.paths[path_key].pieces
    assert [a is b for a, b in zip(old, new, strict=True)] == [False, *[True] * 5]
