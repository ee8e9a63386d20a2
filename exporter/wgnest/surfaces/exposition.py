"""Text exposition (format 0.0.4), byte for byte what prometheus_client's generate_latest()
writes, several times faster on the large per-peer families of a 10k-peer hub: names are
checked and label names sorted once per family, not once per sample. Anything this fast path
does not handle is handed to generate_latest() itself.

`Family` is the light form of a gauge or counter family the per-peer metrics are built in:
label values as a tuple per sample, no prometheus_client objects per sample (their creation
was most of a 10k-peer render). `as_metric()` gives the prometheus_client form, which the
tests compare byte for byte."""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prometheus_client is imported only where its objects are made
    from prometheus_client.core import Metric

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SPECIAL = re.compile(r'[\\\n"]')
_TYPES = {"counter": ("_total", "counter"), "info": ("_info", "gauge"),
          "stateset": ("", "gauge"), "gaugehistogram": ("", "histogram"),
          "unknown": ("", "untyped")}
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")


def _go_float(value: float) -> str:
    """A sample value as prometheus_client's text format writes it (its floatToGoString,
    tested equal): Python's shortest repr, except the special values and a positive number
    of seven or more integer digits, which get Go's exponent form (1234567.0 ->
    1.234567e+06). Written here so serving never imports prometheus_client (its package
    loads its HTTP servers, urllib and more: 4 MiB)."""
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    text = repr(x)
    point = text.find(".")
    if x <= 0 or point <= 6:
        return text
    digits = text[:point] + text[point + 1:]
    mantissa = (digits[0] + "." + digits[1:]).rstrip("0").rstrip(".")
    return f"{mantissa}e+{point - 1:02d}"


def sample_value(value: int | float) -> str:
    """A sample value as line() writes it: an int of fewer than seven digits at once (its
    float's repr, which _go_float would give: 0 -> "0.0", 42 -> "42.0"), else _go_float."""
    if value.__class__ is int and -(10**15) < value < 1_000_000:
        return f"{value}.0"
    return _go_float(value)


def _generate_latest(metric: Metric) -> bytes:
    """prometheus_client's own writing of one family (what the fast path leaves)."""
    from prometheus_client import generate_latest

    class One:
        def collect(self) -> Iterable[Metric]:
            yield metric

    return generate_latest(One())


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _family_text(metric: Metric) -> str | None:
    """One family as generate_latest() writes it; None when this fast path does not apply
    (names outside the legacy character set, timestamps, OpenMetrics-only samples)."""
    suffix, mtype = _TYPES.get(metric.type, ("", metric.type))
    mname = metric.name + suffix
    if not _NAME.fullmatch(mname):
        return None
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    out = [f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n"]
    skip = {metric.name + s for s in _OPENMETRICS_ONLY}
    # (sample name, label names) -> 'name{a="%(a)s",b="%(b)s"}', label names sorted once
    formats: dict[tuple[str, tuple[str, ...]], str] = {}
    for sample in metric.samples:
        labels, value = sample.labels, sample.value
        kind: object = value.__class__
        keys = tuple(labels)
        fmt = formats.get((sample.name, keys))
        if fmt is None:
            if (sample.name in skip or not _NAME.fullmatch(sample.name) or not all(
                    _LABEL.fullmatch(k) and not k.startswith("__") for k in keys)):
                return None
            inner = ",".join(f'{k}="%({k})s"' for k in sorted(keys))
            fmt = formats[sample.name, keys] = f"{sample.name}{{{inner}}}" if keys else "%s"
        if sample.timestamp is not None:
            return None
        # the 0/1 flags are most samples; an int is what floatToGoString() makes of it
        text = ("1.0" if value else "0.0") if kind is int and 0 <= value <= 1 else _go_float(value)
        if not keys:
            out.append(f"{sample.name} {text}\n")
            continue
        try:
            special = _SPECIAL.search("".join(labels.values()))
        except TypeError:  # a label value that is no str
            return None
        if special:
            labels = {k: _escape(v) for k, v in labels.items()}
        out.append(f"{fmt % labels} {text}\n")
    return "".join(out)


@dataclass(slots=True)
class Family:
    """A gauge or counter family: `samples` hold (label values in `labels` order, value)."""

    name: str  # without `_total` for a counter, as prometheus_client names families
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], int | float]] = field(default_factory=list)

    def add(self, values: tuple[str, ...], value: int | float) -> None:
        self.samples.append((values, value))

    def as_metric(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        metric = cls(self.name, self.help, labels=list(self.labels))
        for values, value in self.samples:
            metric.add_metric(list(values), value)
        return metric


def gauge(name: str, doc: str, *labels: str) -> Family:
    return Family(name, "gauge", doc, labels)


def counter(name: str, doc: str, *labels: str) -> Family:
    return Family(name, "counter", doc, labels)


def _sample_format(fam: Family) -> tuple[str, list[int], str] | None:
    """The family's sample name, its label indexes in sorted-name order, and the %-format
    of one sample (label values in that order, then the value); None when the names are
    outside what the fast path handles."""
    sample = fam.name + "_total" if fam.kind == "counter" else fam.name
    if not (_NAME.fullmatch(sample) and all(_LABEL.fullmatch(k) and not k.startswith("__")
                                            for k in fam.labels)):
        return None
    order = sorted(range(len(fam.labels)), key=lambda i: fam.labels[i])
    fmt = sample + "{" + ",".join(f'{fam.labels[i]}="%s"' for i in order) + "} %s\n" \
        if fam.labels else sample + " %s\n"
    return sample, order, fmt


def light_format(fam: Family) -> tuple[str, Callable[[tuple[str, ...], int | float], str]] | None:
    """The family's header, and the function that writes one of its samples, exactly as
    generate_latest() would; None when the names are outside what this fast path handles."""
    form = _sample_format(fam)
    if form is None:
        return None
    sample, order, fmt = form
    doc = fam.help.replace("\\", r"\\").replace("\n", r"\n")
    head = f"# HELP {sample} {doc}\n# TYPE {sample} {fam.kind}\n"

    def line(values: tuple[str, ...], value: int | float) -> str:
        text = sample_value(value)
        if not values:
            return fmt % text
        ordered = [values[i] for i in order]
        if _SPECIAL.search("".join(ordered)):
            ordered = [_escape(v) for v in ordered]
        return fmt % (*ordered, text)

    return head, line


Samples = Sequence[tuple[tuple[str, ...], int | float]]


def samples_writer(fam: Family) -> Callable[[Samples], str] | None:
    """What writes many samples of the family at once, exactly as line() writes each: one
    escape check over all their label values, then one %-format a sample (several times
    faster than line() on a block of peers); None where light_format() is."""
    form, spec = light_format(fam), _sample_format(fam)
    if form is None or spec is None:
        return None
    _head, line = form
    _sample, order, fmt = spec
    if len(order) < 2:  # (itemgetter of one index gives no tuple; such families are small)
        return lambda samples: "".join([line(v, x) for v, x in samples])
    ordered = operator.itemgetter(*order)

    def write(samples: Samples) -> str:
        if _SPECIAL.search("".join(itertools.chain.from_iterable(v for v, _ in samples))):
            return "".join([line(v, x) for v, x in samples])
        return "".join([fmt % (*ordered(v), sample_value(x)) for v, x in samples])

    return write


def needs_escape(text: str) -> bool:
    """Whether a label value holds a character the text format escapes."""
    return _SPECIAL.search(text) is not None


def key_format(fam: Family, device: str) -> str | None:
    """For a family labelled (device, public_key) only: the %-format of one sample of
    `device`, to fill with a key and sample_value(); None for other families, or a device
    name that needs escaping. A WireGuard key is base64: it never does."""
    if fam.labels != ("device", "public_key") or _SPECIAL.search(device):
        return None
    sample = fam.name + "_total" if fam.kind == "counter" else fam.name
    if not _NAME.fullmatch(sample):
        return None
    return sample + '{device="' + device.replace("%", "%%") + '",public_key="%s"} %s\n'


def _light_text(fam: Family) -> str | None:
    form = light_format(fam)
    if form is None:
        return None
    head, line = form
    return head + "".join([line(values, value) for values, value in fam.samples])


def exposition(metrics: Iterable[Metric | Family]) -> bytes:
    """The text format (0.0.4) exactly as prometheus_client's generate_latest() writes it,
    several times faster on large families: names are checked and label names sorted once
    per family, not per sample. A family the fast path does not handle is given to
    generate_latest() itself."""
    out = []  # encoded family by family: no second copy of the whole text as a str
    for metric in metrics:
        if isinstance(metric, Family):
            light = _light_text(metric)
            if light is not None:
                out.append(light.encode())
                continue
            metric = metric.as_metric()
        text = _family_text(metric)
        out.append(text.encode() if text is not None else _generate_latest(metric))
    return b"".join(out)


def as_metrics(families: Sequence[Metric | Family]) -> list[Metric]:
    """The prometheus_client form of every family (for comparisons with generate_latest)."""
    return [f.as_metric() if isinstance(f, Family) else f for f in families]


def with_label(families: Iterable[Metric | Family], label: str, value: str
               ) -> list[Metric | Family]:
    """The families with one more label, first, of the same value on every sample (a
    namespace's families before they are merged with the others')."""
    out: list[Metric | Family] = []
    for fam in families:
        if isinstance(fam, Family):
            out.append(Family(fam.name, fam.kind, fam.help, (label, *fam.labels),
                              [((value, *v), x) for v, x in fam.samples]))
            continue
        from prometheus_client.core import Metric

        copy = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        copy.samples = [s._replace(labels={label: value, **s.labels}) for s in fam.samples]
        out.append(copy)
    return out


def merged(groups: Iterable[Iterable[Metric | Family]]) -> list[Metric | Family]:
    """Families of the same name from several groups as one family each (the text format
    wants each family's samples together), in the order names first appear."""
    out: dict[str, Metric | Family] = {}
    for group in groups:
        for fam in group:
            have = out.get(fam.name)
            if have is None:
                out[fam.name] = fam
                continue
            if isinstance(have, Family) != isinstance(fam, Family):
                raise TypeError(f"family {fam.name} built in two forms")
            have.samples.extend(fam.samples)  # type: ignore[arg-type]
    return list(out.values())
