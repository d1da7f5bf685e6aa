"""The on-disk form of a 4-bit weight: bitsandbytes' own state-dict keys, read and written without
bitsandbytes.

A layer with prefix `p` stores (exactly what `bnb.nn.Linear4bit.state_dict()` holds):

    p.weight                                  packed codes, uint8 [ceil(n / 2), 1] (or a quant_storage view)
    p.weight.absmax                           float32 per block, or uint8 codes when nested
    p.weight.quant_map                        the 16-entry codebook (float32)
    p.weight.nested_absmax                    nested only: float32 per 256 blocks
    p.weight.nested_quant_map                 nested only: the 256-entry code
    p.weight.quant_state.bitsandbytes__<qt>   uint8 bytes of a JSON object: quant_type, blocksize,
                                              dtype, shape (+ nested_blocksize, nested_dtype, nested_offset)

So checkpoints move both ways between fp4, bitsandbytes and Hugging Face's bnb 4-bit models.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

import torch

from ._torch import QUANT_TYPES, VALID_BLOCKSIZES
from .quant_state import QuantState

STATE_KEY_PREFIX = "weight.quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint entry that cannot be loaded; the message names the key."""


def quantized_prefixes(keys) -> list:
    """Module prefixes ("model.layers.0.mlp.up_proj.") that hold a 4-bit weight in these keys."""
    found = []
    for key in keys:
        head, sep, _ = key.rpartition(STATE_KEY_PREFIX)
        if sep and (head == "" or head.endswith(".")):
            found.append(head)
    return found


def entry_names(quant_type: str, nested: bool) -> Tuple[str, ...]:
    """The `weight*` keys one layer stores (relative to the layer's prefix)."""
    names = ("weight", "weight.absmax", "weight.quant_map")
    if nested:
        names += ("weight.nested_absmax", "weight.nested_quant_map")
    return names + (STATE_KEY_PREFIX + quant_type,)


def to_state_dict(packed: torch.Tensor, state: QuantState) -> Dict[str, torch.Tensor]:
    """The `weight*` entries of one layer (keys relative to the layer's prefix)."""
    out = {"weight": packed, "weight.absmax": state.absmax, "weight.quant_map": state.code}
    info = {"quant_type": state.quant_type, "blocksize": int(state.blocksize), "dtype": _dtype_name(state.dtype),
            "shape": [int(d) for d in state.shape]}
    if state.nested:
        out["weight.nested_absmax"] = state.state2.absmax
        out["weight.nested_quant_map"] = state.state2.code.clone()  # unshared, as bitsandbytes saves it
        info.update(nested_blocksize=int(state.state2.blocksize), nested_dtype=_dtype_name(state.state2.dtype),
                    nested_offset=float(state.offset.item()))
    out[STATE_KEY_PREFIX + state.quant_type] = torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8)
    return out


def from_state_dict(entries: Dict[str, torch.Tensor], prefix: str = "",
                    device: Optional[torch.device] = None) -> Tuple[torch.Tensor, QuantState]:
    """(packed uint8 codes, QuantState) from a layer's `weight*` entries, each checked against the
    others. `entries` maps full keys; `prefix` is the layer's. Raises CheckpointError naming the
    key on anything missing, malformed or inconsistent."""

    def key(name):
        return prefix + name

    def get(name):
        if key(name) not in entries:
            raise CheckpointError(f"{key(name)}: missing from the checkpoint")
        value = entries[key(name)]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key(name)}: expected a tensor, got {type(value).__name__}")
        return value

    state_keys = [k for k in entries if k.startswith(key(STATE_KEY_PREFIX))]
    if len(state_keys) != 1:
        raise CheckpointError(f"{key(STATE_KEY_PREFIX)}<fp4|nf4>: expected exactly one quant_state entry, "
                              f"found {state_keys or 'none'}")
    info = _read_json(state_keys[0], get(state_keys[0][len(prefix):]))
    quant_type = info.get("quant_type")
    if quant_type not in QUANT_TYPES or state_keys[0] != key(STATE_KEY_PREFIX + quant_type):
        raise CheckpointError(f"{state_keys[0]}: quant_type {quant_type!r} must be 'fp4' or 'nf4' and match the key")
    blocksize = info.get("blocksize")
    if blocksize not in VALID_BLOCKSIZES:
        raise CheckpointError(f"{state_keys[0]}: blocksize {blocksize!r} is not one of {VALID_BLOCKSIZES}")
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{state_keys[0]}: dtype {info.get('dtype')!r} is not float32, float16 or bfloat16")
    shape = info.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise CheckpointError(f"{state_keys[0]}: shape {shape!r} is not [out_features, in_features]")
    n = shape[0] * shape[1]
    blocks = -(-n // blocksize)

    packed = get("weight")
    if packed.element_size() * packed.numel() != (n + 1) // 2 or not packed.is_contiguous():
        raise CheckpointError(f"{key('weight')}: expected {(n + 1) // 2} contiguous bytes of packed codes for shape "
                              f"{shape}, got {tuple(packed.shape)} {packed.dtype}")
    packed = packed.view(torch.uint8).reshape(-1, 1) if packed.dtype != torch.uint8 else packed.reshape(-1, 1)
    code = _vector(get("weight.quant_map"), key("weight.quant_map"), 16, torch.float32)
    nested = "nested_blocksize" in info or key("weight.nested_absmax") in entries
    absmax = _vector(get("weight.absmax"), key("weight.absmax"), blocks, torch.uint8 if nested else torch.float32)
    state2 = offset = None
    if nested:
        nested_blocksize = info.get("nested_blocksize")
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            raise CheckpointError(f"{state_keys[0]}: nested_blocksize {nested_blocksize!r} is not a positive integer")
        try:
            offset = torch.tensor(float(info["nested_offset"]), dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{state_keys[0]}: nested_offset missing or not a number") from None
        nested_absmax = _vector(get("weight.nested_absmax"), key("weight.nested_absmax"),
                                -(-blocks // nested_blocksize), torch.float32)
        nested_code = _vector(get("weight.nested_quant_map"), key("weight.nested_quant_map"), 256, torch.float32)
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize, dtype=torch.float32)
    for name, value in (("weight.absmax", absmax), ("weight.quant_map", code)) + (
            (("weight.nested_absmax", state2.absmax),) if nested else ()):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{key(name)}: holds NaN or Inf")
    state = QuantState(absmax=absmax, shape=torch.Size(shape), code=code, dtype=dtype, blocksize=blocksize,
                       quant_type=quant_type, offset=offset, state2=state2)
    if device is not None:
        packed = packed.to(device)
        state.to(device)
    return packed, state


def _read_json(name: str, tensor: torch.Tensor) -> dict:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointError(f"{name}: expected a 1-D uint8 tensor of JSON bytes, got {tensor.dtype} "
                              f"{tuple(tensor.shape)}")
    try:
        info = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{name}: expected a JSON object, got {type(info).__name__}")
    return info


def _vector(tensor: torch.Tensor, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype != dtype or tensor.numel() != size:
        raise CheckpointError(f"{name}: expected {size} {str(dtype).replace('torch.', '')} values, got "
                              f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}")
    return tensor.reshape(-1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
