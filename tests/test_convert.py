"""Whole-model conversion: quantize_, the torch-bnb-fp4 converters, and a tiny Hugging Face Llama."""

import pytest
import torch
from torch import nn

import fp4
import fp4.functional as F


def _mlp(device):
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 8)).to(device)


def test_quantize_replaces_every_linear(device):
    model = _mlp(device)
    x = torch.randn(4, 64, device=device)
    fp4.quantize_(model, fp4.FP4Config("nf4", 64, double_quant=True))
    assert all(not isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, fp4.FP4Linear) for m in model.modules()) == 3
    assert model(x).shape == (4, 8)


def test_filter_fn_chooses_layers():
    model = _mlp("cpu")
    fp4.quantize_(model, fp4.FP4Config(), filter_fn=lambda m, name: name != "4")
    assert isinstance(model[0], fp4.FP4Linear) and isinstance(model[4], nn.Linear)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="quant_type"):
        fp4.FP4Config(quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        fp4.FP4Config(blocksize=100)
    with pytest.raises(TypeError, match="compute_dtype: expected torch.float32, torch.float16 or torch.bfloat16"):
        fp4.FP4Config(compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="double_quant: expected a bool"):
        fp4.FP4Config(double_quant="yes")


def test_converters_name_the_argument_they_cannot_take():
    """Wrong kinds of argument stop before anything is converted, naming the argument."""
    model = _mlp("cpu")
    for call, message in (
        (lambda: fp4.quantize_("model"), "model: expected a torch.nn.Module, got str"),
        (lambda: fp4.quantize_(model, "nf4"), "config: expected an fp4.FP4Config, got str"),
        (lambda: fp4.quantize_(model, filter_fn="lm_head"), "filter_fn: expected a callable"),
        (lambda: fp4.recursively_replace_with_fp4_linear(3), "model: expected a torch.nn.Module, got int"),
        (lambda: fp4.recursively_replace_with_fp4_linear(model, as_dtype=torch.int8), "as_dtype: expected"),
        (lambda: fp4.swap_linear_with_bnb_linear(nn.ReLU()), "linear: expected an nn.Linear, got ReLU"),
        (lambda: fp4.swap_linear_with_bnb_linear(nn.Linear(64, 64), dtype=torch.int8), "dtype: expected"),
    ):
        with pytest.raises(TypeError, match=message):
            call()
    assert not any(isinstance(layer, fp4.FP4Linear) for layer in model)  # (nothing converted)
    with pytest.raises(ValueError, match="quant_type"):
        fp4.swap_linear_with_bnb_linear(nn.Linear(64, 64), quant_type="int4")


def test_recursively_replace_ignores_names():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(64, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    fp4.recursively_replace_with_fp4_linear(model, as_dtype=torch.float32, only_replace_bnb_layers=False)
    assert isinstance(model.body, fp4.FP4Linear) and isinstance(model.lm_head, nn.Linear)


def test_recursively_replace_takes_one_name_as_a_string():
    """ignore_layer_names="lm_head" ignores that layer (not the letters l, m, _, ...)."""
    model = nn.Sequential()
    model.add_module("body", nn.Linear(64, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    fp4.recursively_replace_with_fp4_linear(model, as_dtype=torch.float32, only_replace_bnb_layers=False,
                                           ignore_layer_names="lm_head")
    assert isinstance(model.body, fp4.FP4Linear) and isinstance(model.lm_head, nn.Linear)


def _tiny_llama(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(config).to(device).eval()


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_tiny_llama_logits_match_bnb_quantized_model(device, quant_type):
    """fp4.quantize_ on a random tiny Llama gives the logits of the same model with every linear
    weight replaced by bitsandbytes' dequantize(quantize(W))."""
    from conftest import bnb_functional

    B = bnb_functional()
    model = _tiny_llama(device)
    reference = _tiny_llama(device)
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            packed, state = B.quantize_4bit(module.weight.data, blocksize=64, quant_type=quant_type)
            module.weight.data = B.dequantize_4bit(packed, state)
    fp4.quantize_(model, fp4.FP4Config(quant_type), filter_fn=lambda m, name: name != "lm_head")
    assert sum(isinstance(m, fp4.FP4Linear) for m in model.modules()) == 2 * 7
    ids = torch.randint(0, 256, (2, 16), device=device)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
