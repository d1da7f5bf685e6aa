"""QuantState: everything needed to dequantize a 4-bit weight, in bitsandbytes' own terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(eq=False)
class QuantState:
    """The quantization state of a 4-bit tensor, attribute for attribute like
    `bitsandbytes.functional.QuantState`.

    absmax      float32 per-block scales, or (nested) uint8 codes of `absmax - offset`
    shape       shape of the original tensor
    code        the 16-entry codebook (4-bit) or 256-entry code (nested state)
    dtype       dtype of the original tensor (the dtype dequantization returns)
    blocksize   elements per absmax block
    quant_type  "fp4" or "nf4" (None for the nested 8-bit state)
    offset      nested only: the mean subtracted from absmax (0-dim float32 tensor)
    state2      nested only: the QuantState of the 8-bit absmax codes (its absmax, code, blocksize)
    """

    absmax: torch.Tensor
    shape: Optional[torch.Size] = None
    code: Optional[torch.Tensor] = None
    dtype: Optional[torch.dtype] = None
    blocksize: Optional[int] = None
    quant_type: Optional[str] = None
    offset: Optional[torch.Tensor] = None
    state2: Optional["QuantState"] = field(default=None, repr=False)

    @property
    def nested(self) -> bool:
        """True when absmax holds 8-bit codes of nested ("double quant") statistics."""
        return self.state2 is not None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device) -> "QuantState":
        """Moves every tensor to `device` in place (like bitsandbytes) and returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def clone(self) -> "QuantState":
        """A copy holding its own tensors."""
        return QuantState(absmax=self.absmax.clone(), shape=self.shape,
                          code=None if self.code is None else self.code.clone(), dtype=self.dtype,
                          blocksize=self.blocksize, quant_type=self.quant_type,
                          offset=None if self.offset is None else self.offset.clone(),
                          state2=None if self.state2 is None else self.state2.clone())

    def nbytes(self) -> int:
        """Bytes of device memory the state holds."""
        total = sum(t.numel() * t.element_size() for t in (self.absmax, self.code, self.offset) if t is not None)
        return total + (self.state2.nbytes() if self.state2 is not None else 0)

    # ---- bitsandbytes interchange -------------------------------------------------------------
    @classmethod
    def from_bnb(cls, state) -> "QuantState":
        """Wraps a `bitsandbytes.functional.QuantState` (its tensors are shared, not copied)."""
        if state is None:
            raise ValueError("state: expected a bitsandbytes QuantState, got None")
        for attr in ("absmax", "blocksize", "code"):
            if not hasattr(state, attr):
                raise TypeError(f"state: expected a bitsandbytes QuantState, got {type(state).__name__}")
        state2 = getattr(state, "state2", None)
        return cls(
            absmax=state.absmax,
            shape=None if state.shape is None else torch.Size(state.shape),
            code=state.code,
            dtype=state.dtype,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            offset=getattr(state, "offset", None),
            state2=None if state2 is None else cls.from_bnb(state2),
        )

    def to_bnb(self):
        """The same state as a `bitsandbytes.functional.QuantState` (needs bitsandbytes installed)."""
        try:
            from bitsandbytes.functional import QuantState as BnbQuantState
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("QuantState.to_bnb needs bitsandbytes: pip install bitsandbytes") from e
        return BnbQuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=self.offset,
            state2=None if self.state2 is None else self.state2.to_bnb(),
        )
