"""`python -m fp4 bench`: what one row measures, and that GPU methods are timed in turns."""

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_methods_take_turns_starting_one_later_each_round(monkeypatch):
    order = []
    monkeypatch.setattr(bench, "_graph_runner", lambda layers, x, calls: lambda: order.append(layers[0]))
    times = bench._gpu_times({"a": ["a"], "b": ["b"], "c": ["c", "c"]}, None, repeats=3)
    assert sorted(times) == ["a", "b", "c"] and all(t >= 0 for t in times.values())
    warm_up = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert order == warm_up + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_a_replay_calls_whole_rounds_of_copies_at_least_calls_per_replay_times():
    for copies in (1, 2, 3, 5, 16, 17, 64):
        calls = bench.calls_per_replay(copies)
        assert calls % copies == 0 and calls >= bench.CALLS_PER_REPLAY
        assert calls - copies < bench.CALLS_PER_REPLAY  # (no round more than needed)


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
