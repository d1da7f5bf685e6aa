"""Checkpoints: state_dict round trips bit for bit, fp4.save / fp4.load (safetensors), bitsandbytes'
serialized 4-bit state dicts load without bitsandbytes, and bad files fail cleanly, naming the key."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fp4
from fp4.checkpoint_format import CheckpointError


def _model(device="cpu", double_quant=False, quant_type="nf4", tie=False):
    model = nn.Sequential(nn.Embedding(32, 64), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))
    if tie:
        model[3].weight = model[0].weight  # tied weights: one tensor under two keys
    model = model.to(device)
    fp4.quantize_(model, fp4.FP4Config(quant_type, 64, double_quant), progress=False,
                  filter_fn=lambda m, name: name == "1" or (name == "3" and not tie))
    return model


def _same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].cpu(), b[key].cpu()), key


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_state_dict_round_trip_is_bit_exact(device, double_quant, quant_type):
    source = _model(device, double_quant, quant_type)
    target = _model(device, not double_quant, "fp4" if quant_type == "nf4" else "nf4")  # different layout
    target.load_state_dict(source.state_dict())
    _same_state(source.state_dict(), target.state_dict())
    x = torch.randint(0, 32, (3, 5), device=device)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_state_dict_has_bitsandbytes_keys():
    keys = set(_model(double_quant=True).state_dict())
    assert {"1.weight", "1.weight.absmax", "1.weight.quant_map", "1.weight.nested_absmax",
            "1.weight.nested_quant_map", "1.weight.quant_state.bitsandbytes__nf4", "1.bias"} <= keys


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, device, tie):
    source = _model(device, double_quant=True, tie=tie)
    path = tmp_path / "model.safetensors"
    fp4.save(source, path)
    target = nn.Sequential(nn.Embedding(32, 64), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))
    if tie:
        target[3].weight = target[0].weight
    fp4.load(target, path, device=device)
    assert isinstance(target[1], fp4.FP4Linear)  # nn.Linear in the skeleton became 4-bit
    _same_state(source.state_dict(), target.state_dict())
    if tie:
        assert target[3].weight is target[0].weight or target[3].weight.data_ptr() == target[0].weight.data_ptr()


def test_load_into_meta_skeleton(tmp_path):
    source = _model(double_quant=True)
    fp4.save(source, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Embedding(32, 64), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))
    fp4.load(skeleton, tmp_path / "m.safetensors", device="cpu")
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    x = torch.randint(0, 32, (2, 3))
    with torch.no_grad():
        assert torch.equal(skeleton(x), source(x))


def _write_with(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path))


def _assert_untouched(model, before):
    _same_state(before, model.state_dict())


@pytest.mark.parametrize("corrupt, key", [
    (lambda sd: sd.update({"1.weight.absmax": sd["1.weight.absmax"][:-1]}), "1.weight.absmax"),
    (lambda sd: sd.pop("1.weight.quant_map"), "1.weight.quant_map"),
    (lambda sd: sd.update({"1.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{oops"), dtype=torch.uint8)}),
     "1.weight.quant_state.bitsandbytes__nf4"),
    (lambda sd: sd.update({"1.weight": sd["1.weight"][:10]}), "1.weight"),
    (lambda sd: sd.update({"1.weight.absmax": torch.full_like(sd["1.weight.absmax"], float("nan"))}), "1.weight.absmax"),
    (lambda sd: sd.update({"3.weight.quant_state.bitsandbytes__nf4": torch.tensor(
        list(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 97]}).encode()),
        dtype=torch.uint8)}), "3.weight"),
    (lambda sd: sd.update({"0.weight": torch.zeros(31, 64)}), "0.weight"),
])
def test_bad_checkpoint_names_the_key_and_loads_nothing(tmp_path, corrupt, key):
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    corrupt(state)
    path = tmp_path / "bad.safetensors"
    _write_with(path, state)
    target = _model(quant_type="fp4")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        fp4.load(target, path)
    _assert_untouched(target, before)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    fp4.save(_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = _model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fp4.load(target, path)
    _assert_untouched(target, before)
    with pytest.raises(FileNotFoundError, match="path"):
        fp4.load(target, tmp_path / "missing.safetensors")


def test_strict_load_reports_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    fp4.save(_model(), path)
    bigger = nn.Sequential(nn.Embedding(32, 64), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False),
                           nn.Linear(32, 8))
    with pytest.raises(CheckpointError, match=r"missing keys \['4\.bias', '4\.weight'\]"):
        fp4.load(bigger, path)
    fp4.load(bigger, path, strict=False)
    assert isinstance(bigger[1], fp4.FP4Linear) and isinstance(bigger[4], nn.Linear)


def test_load_state_dict_reports_wrong_layer_shape():
    layer = fp4.FP4Linear.from_linear(nn.Linear(64, 32))
    other = fp4.FP4Linear.from_linear(nn.Linear(64, 48))
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(other.state_dict())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_bitsandbytes_state_dict_loads_without_bitsandbytes(tmp_path, double_quant, quant_type):
    """A state dict written by bitsandbytes' Linear4bit loads into plain nn.Linear layers in a
    process where importing bitsandbytes fails, and computes what bitsandbytes computes."""
    from conftest import bnb_functional

    bnb_functional()
    import bitsandbytes as bnb

    linear = nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes here
    assert layer.weight.quant_state is not None
    model = nn.Sequential(layer)
    x = torch.randn(3, 128)
    layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes on its exact fp32 path for the reference
    with torch.no_grad():
        expected = model(x)
    _write_with(tmp_path / "bnb.safetensors", model.state_dict())
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of bitsandbytes now raises ImportError
        import torch, fp4
        from torch import nn
        model = nn.Sequential(nn.Linear(128, 64))
        fp4.load(model, {os.fspath(tmp_path / 'bnb.safetensors')!r})
        assert isinstance(model[0], fp4.FP4Linear), type(model[0])
        io = torch.load({os.fspath(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]), io["expected"], rtol=1e-5, atol=1e-5)
        assert "bitsandbytes" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_fp4_state_dict_loads_into_bitsandbytes():
    """The other direction: bitsandbytes rebuilds its layer from our entries (the way Hugging Face
    loads a pre-quantized checkpoint) and computes the same outputs."""
    from conftest import bnb_functional

    bnb_functional()
    import bitsandbytes as bnb

    source = fp4.FP4Linear.from_linear(nn.Linear(128, 64), "nf4", 64, double_quant=True)
    entries = source.state_dict()
    stats = {k[len("weight."):]: v for k, v in entries.items() if k.startswith("weight.")}
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit.from_prequantized(entries["weight"], stats, device="cpu", module=layer)
    layer.bias = nn.Parameter(entries["bias"])
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), source(x), rtol=1e-5, atol=1e-5)


def test_save_and_load_check_their_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        fp4.save({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="model"):
        fp4.load("not a model", tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="entries"):
        fp4.load_state_dict(_model(), [torch.zeros(1)])
    with pytest.raises(FileNotFoundError, match="path: no folder .*no_folder"):
        fp4.save(_model(), tmp_path / "no_folder" / "x.safetensors")


def test_save_pretrained_and_from_pretrained_check_their_arguments(tmp_path):
    """A model that is not a Hugging Face one leaves no folder behind; a file is not a folder; a
    missing folder is named as one (not taken for a Hub repo id)."""
    with pytest.raises(TypeError, match="model: expected a Hugging Face PreTrainedModel"):
        fp4.save_pretrained(_model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    model = _model()
    model.config = object()  # (a config is all save_pretrained asks of the model before writing)
    with pytest.raises(NotADirectoryError, match="directory: .*file' is a file, not a folder"):
        fp4.save_pretrained(model, tmp_path / "file")
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="directory: no such folder .*missing"):
        fp4.from_pretrained(tmp_path / "missing")
