"""The timer: percentiles, rep counts, cache flushing."""
import time

import pytest

from posattn.bench import timing


def test_percentile_interpolates():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert timing.percentile(xs, 50) == 3.0
    assert timing.percentile(xs, 20) == pytest.approx(1.8)
    assert timing.percentile(xs, 80) == pytest.approx(4.2)
    assert timing.percentile([7.0], 20) == 7.0
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_measure_cpu_sleep_is_timed():
    t = timing.measure(lambda: time.sleep(0.004), "cpu", warmup=1, min_reps=6, max_reps=8, target_s=0.01)
    assert t.timer == "perf_counter" and t.cold_l2
    assert 6 <= t.reps <= 8 and len(t.samples) == t.reps
    assert t.p20 <= t.p50 <= t.p80
    # sleep never returns early; a loaded machine may add a lot, but not 25x
    assert 0.004 <= t.p50 < 0.1


def test_rep_count_follows_target():
    fast = timing.measure(lambda: None, "cpu", warmup=2, min_reps=5, max_reps=40, target_s=1.0, cold_l2=False)
    assert fast.reps == 40 and not fast.cold_l2
    slow = timing.measure(lambda: time.sleep(0.02), "cpu", warmup=1, min_reps=3, max_reps=40, target_s=0.01,
                          cold_l2=False)
    assert slow.reps == 3
    # with a cold cache the flushes count towards the target, so tiny calls do not cost hundreds of flushes
    cold = timing.measure(lambda: None, "cpu", warmup=1, min_reps=4, max_reps=1000,
                          target_s=timing.flush_seconds("cpu") * 20)
    assert 4 <= cold.reps <= 60


def test_flush_buffer_covers_last_level_cache():
    buf = timing.flush_buffer("cpu")
    assert buf.numel() >= 2 * timing._llc_bytes_cpu()
    assert timing.flush_buffer("cpu") is buf  # allocated once
