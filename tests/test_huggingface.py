"""Hugging Face: a tiny random Llama loaded with BitsAndBytesConfig converts with one call and
generates the same tokens; converted models save and reload (fp4.save_pretrained / from_pretrained),
and Hugging Face's own save of a bnb model loads into fp4 too."""

import warnings

import pytest
import torch

import fp4

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load_bnb(folder, device, quant_type, double_quant, dtype):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                                  device_map=str(device), dtype=dtype)
    return _keep_bnb_cpu_in_fp32(model).eval()


def _keep_bnb_cpu_in_fp32(model):
    """bitsandbytes 0.50 would switch CPU layers to a bfloat16 kernel on the first forward; its fp32
    path is the reference fp4 is compared with."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False)


def _reference(model, ids):
    """Greedy tokens and, teacher-forced on them, the logits that chose each one."""
    tokens = _generate(model, ids)
    with torch.no_grad():
        return tokens, model(tokens).logits.float()


def _assert_generates_like(model, ids, reference):
    """Greedy generation picks the reference's tokens, except where the reference itself was a
    near-tie: there fp32 sums in another order may pick the other token (and the rest of that row
    may differ). The logits themselves are compared elsewhere with assert_close."""
    tokens, logits = reference
    got = _generate(model, ids)
    assert got.shape == tokens.shape
    for row in range(tokens.shape[0]):
        differ = (got[row] != tokens[row]).nonzero()
        if len(differ) == 0:
            continue
        p = int(differ[0])
        assert p >= ids.shape[1], "the prompt changed"
        chose = logits[row, p - 1]
        tie = 2 * (1e-3 + 1e-3 * chose.abs().max().item())  # twice assert_close's allowance per logit
        assert chose.max().item() - chose[got[row, p]].item() <= tie, (
            f"row {row}, token {p}: {int(got[row, p])} instead of {int(tokens[row, p])} without a near-tie")


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_model_converts_saves_and_reloads_with_the_same_tokens(llama_folder, tmp_path, device, quant_type,
                                                                   double_quant):
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = _load_bnb(llama_folder, device, quant_type, double_quant, dtype)
    ids = torch.randint(0, 256, (2, 7), device=device)
    expected = _reference(model, ids)
    with torch.no_grad():
        expected_logits = model(ids).logits

    fp4.from_bnb(model, progress=False)
    assert sum(isinstance(m, fp4.FP4Linear) for m in model.modules()) == 14
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_logits, rtol=1e-3, atol=1e-3)
    _assert_generates_like(model, ids, expected)

    fp4.save_pretrained(model, tmp_path / "fp4-model")
    reloaded = fp4.from_pretrained(tmp_path / "fp4-model", device=device)
    assert sum(isinstance(m, fp4.FP4Linear) for m in reloaded.modules()) == 14
    _assert_generates_like(reloaded, ids, expected)


def test_huggingface_save_of_a_bnb_model_loads_into_fp4(llama_folder, tmp_path, device):
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = _load_bnb(llama_folder, device, "nf4", True, dtype)
    ids = torch.randint(0, 256, (1, 5), device=device)
    expected = _reference(model, ids)
    model.save_pretrained(tmp_path / "hf-bnb")
    loaded = fp4.from_pretrained(tmp_path / "hf-bnb", device=device)
    _assert_generates_like(loaded, ids, expected)


def test_fp4_folder_loads_back_into_huggingface_bitsandbytes(llama_folder, tmp_path):
    model = _load_bnb(llama_folder, "cpu", "fp4", False, torch.float32)
    ids = torch.randint(0, 256, (1, 5))
    fp4.from_bnb(model, progress=False)
    expected = _generate(model, ids)
    fp4.save_pretrained(model, tmp_path / "fp4-model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp4-model", device_map="cpu")
    assert type(back.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert torch.equal(_generate(_keep_bnb_cpu_in_fp32(back), ids), expected)


def test_quantize_with_integration_enabled_runs_bnb_model_on_fp4(llama_folder, device, monkeypatch):
    """Unchanged Hugging Face + bitsandbytes code, fp4's kernels underneath."""
    import fp4.integrations.bitsandbytes as fp4_bnb
    import fp4.ops

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = _load_bnb(llama_folder, device, "nf4", False, dtype)
    ids = torch.randint(0, 256, (1, 6), device=device)
    expected = _reference(model, ids)
    calls = []
    original = fp4.ops.linear_4bit_prepared
    monkeypatch.setattr(fp4.ops, "linear_4bit_prepared", lambda *a, **k: calls.append(1) or original(*a, **k))
    with fp4_bnb.enabled():
        _assert_generates_like(model, ids, expected)
    assert len(calls) >= 14
