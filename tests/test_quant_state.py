"""fp4.QuantState converts to and from bitsandbytes' QuantState without copying."""

import torch

import fp4
import fp4.functional as F
from conftest import bnb_functional


def test_round_trip_through_bitsandbytes(device):
    B = bnb_functional()
    packed, state = F.quantize_4bit(torch.randn(100, 64, device=device), compress_statistics=True, quant_type="nf4")
    bnb_state = state.to_bnb()
    assert isinstance(bnb_state, B.QuantState) and bnb_state.nested
    assert bnb_state.absmax is state.absmax and bnb_state.state2.absmax is state.state2.absmax
    # bitsandbytes itself dequantizes fp4's state to fp4's values
    assert torch.equal(B.dequantize_4bit(packed, bnb_state), F.dequantize_4bit(packed, state))
    back = fp4.QuantState.from_bnb(bnb_state)
    assert back.absmax is state.absmax and back.offset is state.offset
    assert (back.blocksize, back.quant_type, back.dtype, back.shape) == (64, "nf4", torch.float32, (100, 64))
    assert back.state2.blocksize == 256


def test_to_device_moves_everything():
    packed, state = F.quantize_4bit(torch.randn(64, 64), compress_statistics=True)
    state.to("cpu")
    assert state.device.type == "cpu" and state.state2.absmax.device.type == "cpu"
    assert state.nbytes() == 64 + 16 * 4 + 4 + 4 + 256 * 4


def test_from_bnb_rejects_other_objects():
    import pytest

    with pytest.raises(TypeError, match="state: expected a bitsandbytes QuantState"):
        fp4.QuantState.from_bnb(object())
