"""benchmarks/bench_sampler.py's decoding-alone figure: never negative, withheld when noise swamps it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_sampler", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampler.py"
)
bench_sampler = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sampler)


def test_steady_timings_give_tokens_over_the_median():
    rate, note = bench_sampler.decode_rate(63, [0.0100, 0.0102, 0.0098, 0.0101, 0.0099])
    assert rate == pytest.approx(6300.0)  # 63 tokens / 10 ms, by hand
    assert note == "spread 2%"  # interquartile range 0.0101 - 0.0099 over 10 ms


@pytest.mark.parametrize(
    "seconds",
    [
        [-0.002, 0.001, -0.001, 0.0005, -0.003],  # differences of noisy timings: median below zero
        [0.0010, 0.0100, 0.0002, 0.0200, 0.0040],  # positive median 4 ms, interquartile range 9 ms
        [0.0, 0.0, 0.0],
    ],
)
def test_noise_that_swamps_the_figure_gives_no_figure(seconds):
    rate, note = bench_sampler.decode_rate(63, seconds)
    assert rate is None and note.startswith("unresolved:")
