"""`python -m fp4 bench`: what one row measures, and that GPU methods are timed in turns."""

import statistics
import time

import pytest
import torch

from fp4.cli import bench


def test_bench_row_times_each_method_and_checks_the_result(device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    row = bench.bench_one(256, 512, 2, dtype, "nf4", device, repeats=3, peers=False)
    assert row["shape"] == [256, 512] and row["batch"] == 2 and row["format"] == "nf4"
    assert row["torch_us"] > 0 and row["fp4_us"] > 0
    assert row["bitsandbytes_us"] is None and row["torchao_us"] is None  # (peers off)
    assert row["floor_us"] == pytest.approx(bench.weight_bytes_4bit(256, 512) / bench.PEAK_COPY_BW * 1e6)
    assert row["fp4_rel_err"] < 2e-3  # against the dequantized weight in float64
    assert row["copies"] == (1 if device.type == "cpu" else bench.copies_beyond_l2(256, 512, device))


def test_a_sustained_row_holds_each_method_for_the_time_asked(device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    row = bench.bench_one(256, 512, 2, dtype, "nf4", device, repeats=3, peers=False, sustain_s=0.3)
    assert time.perf_counter() - began >= 2 * 0.3  # (torch and fp4, each held alone)
    assert row["sustain_s"] == 0.3 and row["torch_us"] > 0 and row["fp4_us"] > 0
    assert row["fp4_rel_err"] < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_sustained_replay_is_timed_over_the_second_half_of_its_window():
    def run():
        torch.cuda._sleep(1_000_000)  # (~0.5-0.7 ms of one SM spinning)

    for _ in range(3):
        run()
    alone = statistics.median(bench._replay_us(run) for _ in range(5))
    began = time.perf_counter()
    held = bench._sustained_replay_us(run, 0.5)
    assert time.perf_counter() - began >= 0.5
    assert 0.8 * alone < held < 1.25 * alone  # (one replay's time, not the window's or a share of it)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_methods_take_turns_starting_one_later_each_round(monkeypatch):
    order = []
    monkeypatch.setattr(bench, "_graph_runner", lambda layers, x, calls: lambda: order.append(layers[0]))
    monkeypatch.setattr(bench, "MIN_REPLAY_US", 0.0)  # (one round each: no second capture)
    times = bench._gpu_times({"a": ["a"], "b": ["b"], "c": ["c", "c"]}, None, repeats=3)
    assert sorted(times) == ["a", "b", "c"] and all(t >= 0 for t in times.values())
    warm_up = ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # (3 warm-up replays and the one timed for its length)
    assert order == warm_up + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_a_replay_makes_whole_rounds_of_copies_until_it_lasts_min_replay_us():
    for copies in (1, 2, 3, 17):
        for round_us in (1.0, 52.0, 599.0, 600.0, 5000.0):
            calls = bench.calls_per_replay(copies, round_us)
            rounds = calls // copies
            assert calls % copies == 0 and rounds >= 1
            assert rounds * round_us >= bench.MIN_REPLAY_US
            assert rounds == 1 or (rounds - 1) * round_us < bench.MIN_REPLAY_US  # (no round more than needed)
    assert bench.calls_per_replay(2, 0.0) >= 2  # (a replay timed at zero still makes whole rounds)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_replay_calls_the_copies_in_turn():
    called = []

    class Layer(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            called.append(self.name)
            return x + 1

    x = torch.zeros(4, device="cuda")
    bench._graph_runner([Layer("a"), Layer("b"), Layer("c")], x, calls=7)
    assert called == ["a", "b", "c"] + ["a", "b", "c", "a", "b", "c", "a"]  # (warm-up, then the capture)
