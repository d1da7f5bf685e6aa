"""Training through frozen 4-bit weights: gradients to the input and bias equal those of the
dequantized reference; the input gradient never holds a whole dense weight; a LoRA adapter trains."""

import pytest
import torch
from torch import nn

import fp4
import fp4.ops

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _reference_grads(layer, x, grad_out):
    """Gradients of the same layer with its dequantized weight, in float64."""
    weight = layer.dequantize().double()
    x64 = x.detach().double().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    y = nn.functional.linear(x64, weight, bias)
    y.backward(grad_out.double())
    return x64.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(96, 64), (200, 136), (64, 320)])
def test_input_and_bias_gradients_match_dequantized_reference(device, dtype, double_quant, shape):
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("half-precision matmuls on CPU are slow; covered in float32")
    out_features, in_features = shape
    layer = fp4.FP4Linear.from_linear(nn.Linear(in_features, out_features).to(device, dtype), "fp4", 64,
                                      double_quant)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, in_features, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    grad_x, grad_bias = _reference_grads(layer, x, grad_out)
    tol = TOL[dtype] * max(1.0, grad_x.abs().max().item())
    torch.testing.assert_close(x.grad.double(), grad_x, rtol=TOL[dtype], atol=tol)
    torch.testing.assert_close(layer.bias.grad.double(), grad_bias, rtol=TOL[dtype], atol=tol)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_frozen_bias_gets_no_gradient(device):
    layer = fp4.FP4Linear.from_linear(nn.Linear(64, 32).to(device))
    x = torch.randn(3, 64, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is None


def test_input_gradient_in_slabs_matches_whole(device, monkeypatch):
    """The slab loop (taken for large weights) gives what one whole dequantize gives."""
    layer = fp4.FP4Linear.from_linear(nn.Linear(192, 300).to(device), "nf4", 64, double_quant=True)
    x = torch.randn(7, 192, device=device, requires_grad=True)
    grad_out = torch.randn(7, 300, device=device)
    layer(x).backward(grad_out)
    whole = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(fp4.ops, "GRAD_SLAB_ELEMENTS", 64 * 192)  # 64 rows per slab: 5 slabs, last partial
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, whole, rtol=1e-5, atol=1e-5)
    reference, _ = _reference_grads(layer, x, grad_out)
    torch.testing.assert_close(x.grad.double(), reference, rtol=1e-4, atol=1e-4)


def test_no_grad_and_grad_paths_agree(device):
    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 64).to(device))
    x = torch.randn(4, 128, device=device)
    with torch.no_grad():
        fast = layer(x)
    traced = layer(x.clone().requires_grad_())
    torch.testing.assert_close(traced.detach(), fast, rtol=0, atol=0)


def _train(model, parameters, x, target, steps=30):
    """Adam on an MSE loss; returns the loss of every step."""
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class LoRA(nn.Module):
    """A minimal low-rank adapter: base(x) + scale * B(A(x)), only A and B trainable."""

    def __init__(self, base, rank=4, scale=1.0):
        super().__init__()
        self.base, self.scale = base, scale
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def test_lora_adapter_on_fp4_layers_trains(device):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16)).to(device)
    student = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16)).to(device)
    fp4.quantize_(student, fp4.FP4Config("nf4"), progress=False)
    student[0], student[2] = LoRA(student[0]).to(device), LoRA(student[2]).to(device)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    x = torch.randn(256, 64, device=device)
    losses = _train(student, trainable, x, teacher(x).detach())
    assert losses[-1] < 0.5 * losses[0]


def test_peft_lora_trains_on_a_model_converted_from_bitsandbytes_layout(device):
    """peft targets nn.Linear / bnb layers by type; with fp4 the QLoRA recipe is: apply peft to the
    float model's adapters as usual and the FP4Linear base layers carry the gradients."""
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 16)

        def forward(self, x):
            return self.down(torch.tanh(self.up(x)))

    model = Block().to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["up", "down"]))
    # Swap each adapter's frozen base layer for its 4-bit version.
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Linear):
            module.base_layer = fp4.FP4Linear.from_linear(module.base_layer, "nf4")
    assert sum(isinstance(m, fp4.FP4Linear) for m in model.modules()) == 2
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = _train(model, trainable, torch.randn(128, 64, device=device), torch.randn(128, 16, device=device))
    assert losses[-1] < losses[0]
