"""wgnest.surfaces.exposition writes exactly what prometheus_client's generate_latest() writes."""

from __future__ import annotations

import math
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from wgnest.surfaces.exposition import exposition

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['a"b', "back\\slash", "new\nline", "😀", ""])
VALUES = st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=True) | st.just(2**64 - 1)


class Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def reference(metrics: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(metrics))
    return generate_latest(registry)


@st.composite
def families(draw: st.DrawFn) -> Metric:
    name = "wgtest_" + draw(NAMES)
    labels = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), max_size=3,
                           unique=True))
    kind = draw(st.sampled_from(["gauge", "counter", "histogram", "info"]))
    doc = draw(TEXT)
    rows = draw(st.lists(st.tuples(st.lists(TEXT, min_size=len(labels), max_size=len(labels)),
                                   VALUES), max_size=5))
    if kind == "gauge":
        fam: Metric = GaugeMetricFamily(name, doc, labels=labels)
        for values, v in rows:
            fam.add_metric(values, v)
    elif kind == "counter":
        fam = CounterMetricFamily(name, doc, labels=labels)
        for values, v in rows:
            fam.add_metric(values, abs(v) if not math.isnan(v) else 0)
    elif kind == "info":
        fam = InfoMetricFamily(name, doc, labels=labels)
        for values, _v in rows:
            fam.add_metric(values, {"version": "1"})
    else:
        fam = HistogramMetricFamily(name, doc, labels=labels)
        for values, _v in rows:
            fam.add_metric(values, [("0.001", 1), ("1.0", 2), ("+Inf", 3)], 0.5)
    return fam


@settings(max_examples=300, deadline=None)
@given(st.lists(families(), max_size=4, unique_by=lambda m: m.name))
def test_same_bytes_as_generate_latest(metrics: list[Metric]) -> None:
    assert exposition(metrics) == reference(metrics)


def test_per_peer_family_same_bytes() -> None:
    fam = GaugeMetricFamily("wireguard_peer_nested", "1 if nested.",
                            labels=["device", "public_key", "outer_device"])
    for i in range(1000):
        fam.add_metric([f"wg{i % 3}", f"key{i}+/=", "wg0" if i % 2 else ""], i % 2)
    assert exposition([fam]) == reference([fam])


def test_light_families_write_what_generate_latest_writes() -> None:
    """The per-peer families are built as light Family objects; their text is byte for byte
    the prometheus_client form's, names with quotes, newlines and backslashes included."""
    from tests.test_analysis import KA, KB, double, ipv6, other_tunnels, seed
    from wgnest.analysis.paths import diagnose
    from wgnest.surfaces.exposition import as_metrics
    from wgnest.surfaces.metrics import wireguard_families

    names = {KA: 'the "first"\nline', KB: "back\\slash ünï"}
    for build in (seed, double, ipv6, other_tunnels):
        snap = build()
        families = wireguard_families(snap, diagnose(snap), names)
        assert exposition(families) == reference(as_metrics(families))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(TEXT, min_size=2, max_size=2), VALUES), max_size=6),
       st.sampled_from(["gauge", "counter"]))
def test_light_family_any_values(rows: list[tuple[list[str], float]], kind: str) -> None:
    from wgnest.surfaces.exposition import Family

    fam = Family("wgtest_light", kind, "help \\ with\nnewline", ("zeta", "alpha"))
    for values, value in rows:
        fam.add((values[0], values[1]), abs(value) if kind == "counter" and value == value
                else (0 if kind == "counter" else value))
    assert exposition([fam]) == reference([fam.as_metric()])


def test_allowed_ips_info_one_series_per_allowed_ip_sorted_fully() -> None:
    """mdlayher's wireguard_peer_allowed_ips_info{device,public_key,allowed_ips,family}, and
    the joined label sorted by family, then address, then prefix."""
    import dataclasses
    import ipaddress

    from tests.test_analysis import KB, seed
    from wgnest.analysis.paths import diagnose
    from wgnest.surfaces.metrics import wireguard_families

    s = seed()
    nets = tuple(ipaddress.ip_network(n) for n in
                 ("fd00::/64", "10.2.0.0/24", "10.1.0.0/24", "10.1.0.0/16"))
    wg1 = dataclasses.replace(s.devices[1], peers=(dataclasses.replace(
        s.devices[1].peers[0], allowed_ips=nets),))
    s = dataclasses.replace(s, devices=(s.devices[0], wg1))
    text = exposition(wireguard_families(s, diagnose(s), {})).decode()
    rows = [line for line in text.splitlines()
            if line.startswith("wireguard_peer_allowed_ips_info{") and KB in line]
    assert [r.split('allowed_ips="')[1].split('"')[0] for r in rows] == [
        "10.1.0.0/16", "10.1.0.0/24", "10.2.0.0/24", "fd00::/64"]
    assert 'family="IPv6"' in rows[-1]
    assert 'family="IPv4"' in rows[0]
    assert 'allowed_ips="10.1.0.0/16,10.1.0.0/24,10.2.0.0/24,fd00::/64"' in text


_V6_EDGES = st.sampled_from([0, 1, 2, 0xFFFF << 32, (0xFFFF << 32) + 1, 1 << 48, (1 << 48) - 1,
                             (1 << 32) - 1, 1 << 32, 0xFE80 << 112, (1 << 128) - 1])


@settings(max_examples=3000)
@given(st.one_of(st.integers(0, (1 << 128) - 1), _V6_EDGES,
                 st.integers(0, 0xFFFF).map(lambda w: w << 80 | 1),  # zero runs of all lengths
                 st.lists(st.sampled_from([0, 0, 1, 0xFFFF]), min_size=8, max_size=8).map(
                     lambda ws: sum(w << (16 * i) for i, w in enumerate(ws)))),
       st.integers(0, 128), st.integers(0, (1 << 32) - 1), st.integers(0, 32))
def test_network_text_is_str_of_the_network(v6: int, plen6: int, v4: int, plen4: int) -> None:
    """The labels' inet_ntop/inet_ntoa text of a network is ipaddress's own str()."""
    import ipaddress

    from wgnest.surfaces.metrics import network_text

    six = ipaddress.IPv6Network((v6, plen6), strict=False)
    zoned = ipaddress.IPv6Network(f"{six.network_address}%eth0/{plen6}")
    for net in (six, zoned, ipaddress.IPv4Network((v4, plen4), strict=False)):
        assert network_text(net) == str(net)


def test_cached_wireguard_text_is_the_exposition_of_the_families() -> None:
    """wireguard_pieces (blocks of unchanged peers and paths reused) hold exactly what
    exposition(wireguard_families()) writes: on every scenario of the analysis tests, cold,
    warm, after a peer changed, a path changed and a name changed."""
    import dataclasses

    from tests.test_analysis import CASES
    from wgnest.analysis.paths import PeerPath, diagnose
    from wgnest.model.host import Snapshot
    from wgnest.surfaces.gzipped import text_of
    from wgnest.surfaces.metrics import LineCache, wireguard_families, wireguard_pieces

    def wireguard_text(snap: Snapshot, paths: list[PeerPath], names: dict[str, str],
                       cache: LineCache) -> bytes:
        return text_of(wireguard_pieces(snap, paths, names, cache))

    for _name, build, *_rest in CASES:
        snap = build()
        snap = dataclasses.replace(snap, taken_at=1_700_000_100.0, devices=tuple(
            dataclasses.replace(d, peers=tuple(
                dataclasses.replace(p, last_handshake=1_700_000_000.0 if i % 2 else 0.0,
                                    rx_bytes=i)
                for i, p in enumerate(d.peers))) for d in snap.devices))
        paths = diagnose(snap)
        names = {p.public_key: f"peer {i}" for d in snap.devices for i, p in enumerate(d.peers)}
        cache = LineCache()
        for _round in range(2):
            want = exposition(wireguard_families(snap, paths, names))
            assert wireguard_text(snap, paths, names, cache) == want
        assert cache.peers
        assert all(b.peers and b.pieces for b in cache.peers.values())
        # one peer's counter moves, one path is diagnosed again, one name changes
        first = snap.devices[0]
        moved = dataclasses.replace(first.peers[0], rx_bytes=10**12)
        snap2 = dataclasses.replace(snap, taken_at=1_700_000_200.0, devices=(
            dataclasses.replace(first, peers=(moved, *first.peers[1:])), *snap.devices[1:]))
        paths2 = [dataclasses.replace(paths[0], gateway="203.0.113.254"), *paths[1:]]
        names2 = {**names, first.peers[-1].public_key: 'renamed "x"'}
        got = wireguard_text(snap2, paths2, names2, cache)
        assert got == exposition(wireguard_families(snap2, paths2, names2))
        assert b"1e+12" in got
        # its counter moves again, with its allowed IPs (and so its info and allowed lines)
        import ipaddress
        net = ipaddress.ip_network("198.51.100.0/24")
        again = dataclasses.replace(moved, rx_bytes=7, allowed_ips=(*moved.allowed_ips, net))
        snap3 = dataclasses.replace(snap2, devices=(
            dataclasses.replace(first, peers=(again, *first.peers[1:])), *snap.devices[1:]))
        got = wireguard_text(snap3, paths2, names2, cache)
        assert got == exposition(wireguard_families(snap3, paths2, names2))
        assert b"198.51.100.0/24" in got


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                 st.sampled_from([0.0, -0.0, 1e6, 999999.0, 1234567.0, 1e7, 10000000.5,
                                  123456789012345.6, 1234567890123456.0, 1e16, 1e22,
                                  5e-324, 0.1, 1.5e-7, 2**53, -1234567.0, 0, 1, 999999,
                                  1000000, -(10**15) + 1, -(10**15), 123456])))
def test_sample_values_are_written_as_prometheus_client_writes_them(value: float) -> None:
    from prometheus_client.utils import floatToGoString

    from wgnest.surfaces.exposition import _go_float, sample_value

    assert _go_float(value) == floatToGoString(value)
    assert sample_value(value) == floatToGoString(value)  # (its int shortcut too)


def test_serving_never_imports_prometheus_client() -> None:
    """Its package loads its HTTP servers, urllib and more (4 MiB): the exposition is written
    by wgnest; the content type it is served with is prometheus_client's."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from tests.fresh_python import run_fresh
    from wgnest.runtime.web import CONTENT_TYPE

    assert CONTENT_TYPE.decode() == CONTENT_TYPE_LATEST
    code = ("import sys, wgnest.runtime.serve, wgnest.runtime.cli\n"
            "from wgnest.runtime.refresher import Refresher\n"
            "from wgnest.model.host import Snapshot\n"
            "state = Refresher(lambda: Snapshot(1.0), 5.0).refresh_once()\n"
            "assert b'wgnest_collector_success' in state.exposition\n"
            "print(*(m in sys.modules for m in sys.argv[1:]))\n")
    # nor PyYAML (only with a web config), importlib.metadata (only for --version), nor
    # ssl, OpenSSL's hashes or bcrypt (only with TLS or basic auth), tomllib (only with a
    # peer names file), json (only `check --json`, tags) nor html's entities
    unused = ("prometheus_client", "yaml", "importlib.metadata", "ssl", "_hashlib", "bcrypt",
              "tomllib", "json", "html")
    assert run_fresh(code, *unused).stdout.split() == ["False"] * len(unused)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(TEXT, min_size=4, max_size=4), VALUES), max_size=8),
       st.sampled_from([("zeta", "alpha", "mid", "beta"), ("a", "b", "c", "d"),
                        ("d", "c", "b", "a")]), st.sampled_from(["gauge", "counter"]))
def test_samples_writer_writes_what_line_writes(
        rows: list[tuple[list[str], float]], labels: tuple[str, ...], kind: str) -> None:
    """All samples at once (one escape check for all of them) is each sample by line()."""
    from wgnest.surfaces.exposition import Family, light_format, samples_writer

    fam = Family("wgtest_many", kind, "help", labels)
    for values, value in rows:
        fam.add(tuple(values), value)
    form, write = light_format(fam), samples_writer(fam)
    assert form is not None
    assert write is not None
    _head, line = form
    assert write(fam.samples) == "".join(line(v, x) for v, x in fam.samples)
    assert form[0] + write(fam.samples) == exposition([fam]).decode()


@given(st.text())
def test_status_page_escapes_as_html_does(text: str) -> None:
    """The status page's own escape (html's module is not loaded) is html.escape's."""
    import html

    from wgnest.surfaces.status_page import escape

    assert escape(text) == html.escape(text, quote=True)
