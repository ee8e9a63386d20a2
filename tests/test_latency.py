from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from wgnest.analysis.latency import latency_anomaly, median, overhead_ratio


def noisy(center: float, n: int = 30, jitter: float = 0.2, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-jitter, jitter)) for _ in range(n)]


def test_median() -> None:
    assert median([]) is None
    assert median([3.0]) == 3.0
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([float("nan"), 1.0]) == 1.0


def test_noise_is_no_anomaly() -> None:
    flag, reason = latency_anomaly(noisy(0.020, seed=1), noisy(0.020, seed=2),
                                   noisy(0.020, n=300, seed=3))
    assert not flag, reason
    assert reason.startswith("ok")


def test_single_spikes_are_no_anomaly() -> None:
    real = noisy(0.0003)
    real[5], real[17] = 1.9, 0.8  # two lone spikes out of 30
    base = noisy(0.0003, n=300, seed=4)
    base[100] = 2.0
    flag, reason = latency_anomaly(real, noisy(0.0003, seed=2), base)
    assert not flag, reason
    assert 0.8 < (overhead_ratio(real, noisy(0.0003, seed=2)) or 0) < 1.3


def test_nested_tunnel_is_an_anomaly() -> None:
    real, direct = noisy(0.040), noisy(0.0003, seed=2)
    flag, reason = latency_anomaly(real, direct, real)
    assert flag
    assert "direct" in reason
    ratio = overhead_ratio(real, direct)
    assert ratio is not None
    assert 100 < ratio < 160


def test_fix_applied_equal_paths_no_anomaly() -> None:
    same = noisy(0.012)
    assert not latency_anomaly(same, same, noisy(0.040, n=300))[0]  # slower baseline: fine
    assert overhead_ratio(same, same) == 1.0


def test_small_absolute_excess_is_tolerated() -> None:
    # 3x slower but only 0.6 ms more (LAN): below min_excess, not worth an alert
    assert not latency_anomaly(noisy(0.0009), noisy(0.0003, seed=2), [])[0]
    assert latency_anomaly(noisy(0.0009), noisy(0.0003, seed=2), [], min_excess=0.0001)[0]


def test_loss_only_windows_never_flag() -> None:
    assert latency_anomaly([], [], []) == (False, "not enough samples on the real path (0 < 3)")
    assert not latency_anomaly([], noisy(0.0003), noisy(0.0003, n=300))[0]
    assert not latency_anomaly([0.05, 0.05], noisy(0.0003), [])[0]  # 2 answers of 30: too few
    flag, reason = latency_anomaly(noisy(0.05), [], [])  # direct all lost: no comparison
    assert not flag
    assert "too few" in reason
    assert overhead_ratio(noisy(0.05), []) is None


def test_jump_above_own_baseline() -> None:
    baseline = noisy(0.010, n=300, seed=5)
    recent = noisy(0.035, seed=6)
    flag, reason = latency_anomaly(recent, [], baseline + recent)
    assert flag
    assert "baseline" in reason
    assert not latency_anomaly(noisy(0.012, seed=6), [], baseline)[0]  # +20 %: no jump


def test_zero_direct_median_has_no_ratio() -> None:
    assert overhead_ratio([0.01], [0.0, 0.0, 0.0]) is None
    assert not latency_anomaly(noisy(0.01), [0.0] * 5, [])[0]


samples = st.lists(st.floats(0, 10) | st.floats() | st.just(0.0), max_size=40)


@given(samples, samples, samples, st.floats(0.5, 10), st.floats(0, 1), st.integers(0, 5))
def test_never_raises(real: list[float], direct: list[float], base: list[float], ratio: float,
                      excess: float, n: int) -> None:
    flag, reason = latency_anomaly(real, direct, base, ratio=ratio, min_excess=excess,
                                   min_samples=n)
    assert isinstance(flag, bool)
    assert reason
    assert "\n" not in reason


@given(samples, samples)
def test_ratio_none_iff_empty_or_zero(real: list[float], direct: list[float]) -> None:
    r, d = median(real), median(direct)
    value = overhead_ratio(real, direct)
    assert (value is None) == (r is None or d is None or d <= 0)


def test_peer_verdict_is_remembered_for_the_same_series_only() -> None:
    """A peer whose series snapshots are the very same objects gets the very same verdict;
    a new snapshot of one series (it was probed again) is judged again."""
    import ipaddress

    from wgnest.analysis.latency import peer_verdict
    from wgnest.model.probes import ProbeTarget, SeriesSnapshot

    def series(path: str, rtts: list[float]) -> SeriesSnapshot:
        target = ProbeTarget("wg1", "K" * 43 + "=", path, ipaddress.ip_address("10.0.0.1"), 0)
        return SeriesSnapshot.of(target, len(rtts), len(rtts), (), sum(rtts), tuple(rtts),
                                 tuple(rtts))

    slow, fast = series("tunnel", noisy(0.040)), series("direct", noisy(0.010))
    first = peer_verdict("wg1", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 1.5, 0.005)
    assert first.anomaly
    again = peer_verdict("wg1", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 1.5, 0.005)
    assert again is first
    healed = series("tunnel", noisy(0.010, seed=2))
    after = peer_verdict("wg1", "K" * 43 + "=", {"tunnel": healed, "direct": fast}, 1.5, 0.005)
    assert not after.anomaly
    looser = peer_verdict("wg1", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 10.0, 0.005)
    assert not looser.anomaly  # another ratio: judged again
    # each ratio keeps its own verdicts (threads with two ratios never get the other's)
    strict = peer_verdict("wg1", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 1.5, 0.005)
    assert strict.anomaly
    assert peer_verdict("wg1", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 10.0,
                        0.005) is looser
    assert peer_verdict("wg1", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 1.5,
                        0.005) is strict
    # the same key on another device (verdicts are kept by key): its own verdict
    other = peer_verdict("wg2", "K" * 43 + "=", {"tunnel": slow, "direct": fast}, 10.0, 0.005)
    assert other is not looser
    assert other.device == "wg2"
    assert peer_verdict("wg2", "K" * 43 + "=", {"direct": fast, "tunnel": slow}, 10.0,
                        0.005) is not other  # (in another order: judged again)
