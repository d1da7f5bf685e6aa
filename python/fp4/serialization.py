"""Saving and loading 4-bit models: `fp4.save` / `fp4.load` (one safetensors file) and
`fp4.save_pretrained` / `fp4.from_pretrained` (a Hugging Face model folder).

Files hold bitsandbytes' state-dict keys (see fp4.checkpoint_format), so a checkpoint written by
bitsandbytes or by Hugging Face for a bnb 4-bit model loads here without bitsandbytes, and ours
load there. Loading checks the whole file against the model before changing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Optional, Union

import torch
from torch import nn

from . import checkpoint_format
from .checkpoint_format import CheckpointError
from .convert import _set_submodule
from .nn.linear import FP4Linear, _is_bnb_linear4bit

PathLike = Union[str, os.PathLike]
WEIGHTS_NAME = "model.safetensors"  # Hugging Face's single-file name


def save(model: nn.Module, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes `model.state_dict()` to one safetensors file. Tensors that share memory (tied
    weights) are written once; `load` restores the sharing. `metadata`: extra strings to store."""
    from safetensors.torch import save_file

    _check_model(model)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: no folder {folder!r} to write {os.fspath(path)!r} into")
    tensors, aliases = _unique_tensors(model.state_dict())
    header = {"format": "pt", "fp4.aliases": json.dumps(aliases)}
    header.update(metadata or {})
    save_file(tensors, os.fspath(path), metadata=header)


def load(model: nn.Module, path: PathLike, device: Optional[Union[str, torch.device]] = None,
         strict: bool = True) -> nn.Module:
    """Loads a checkpoint written by `save`, by bitsandbytes or by Hugging Face (safetensors) into
    `model`, in place, and returns it.

    Layers stored in 4 bits become FP4Linear, whatever they are in `model` (nn.Linear, FP4Linear,
    bnb Linear4bit, or on the meta device), so a model built from its config loads a quantized
    checkpoint directly. `device`: where the loaded tensors go (default: the model's device, CPU
    for a meta-device model). With `strict`, missing or unexpected keys are an error. Every entry
    is checked before the model changes: a bad file raises CheckpointError naming the key and
    leaves the model as it was.
    """
    _check_model(model)
    entries = _read(path)
    return load_state_dict(model, entries, device=device, strict=strict)


def load_state_dict(model: nn.Module, entries: Dict[str, torch.Tensor],
                    device: Optional[Union[str, torch.device]] = None, strict: bool = True) -> nn.Module:
    """`load` for a state dict already in memory (e.g. a bitsandbytes model's `state_dict()`)."""
    _check_model(model)
    if not isinstance(entries, dict):
        raise TypeError(f"entries: expected a dict of tensors (a state dict), got {type(entries).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    # 1. Check everything, changing nothing.
    replacements = {}
    for prefix in checkpoint_format.quantized_prefixes(entries):
        name = prefix[:-1]
        module = _get_submodule(model, name)
        if not isinstance(module, (nn.Linear, FP4Linear)) and not _is_bnb_linear4bit(module):
            raise CheckpointError(f"{prefix}weight: the checkpoint holds a 4-bit linear weight here, but the model has "
                                  f"{type(module).__name__ if module is not None else 'no module'} at {name!r}")
        packed, state = checkpoint_format.from_state_dict(entries, prefix)
        expected = (module.out_features, module.in_features)
        if tuple(state.shape) != expected:
            raise CheckpointError(f"{prefix}weight: shape {tuple(state.shape)} in the checkpoint, {expected} in the model")
        bias = entries.get(prefix + "bias")
        if (bias is None) != (getattr(module, "bias", None) is None):
            raise CheckpointError(f"{prefix}bias: {'missing from' if bias is None else 'unexpected in'} the checkpoint")
        if bias is not None and tuple(bias.shape) != (state.shape[0],):
            raise CheckpointError(f"{prefix}bias: shape {tuple(bias.shape)}, expected ({state.shape[0]},)")
        replacements[name] = (packed, state, bias)
    quantized_keys = {k for k in entries if any(k.startswith(prefix + "weight") or k == prefix + "bias"
                                                for prefix in (n + "." for n in replacements))}
    rest = {k: v for k, v in entries.items() if k not in quantized_keys}
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(n + ".weight") or k == n + ".bias" for n in replacements)}
    for key, value in rest.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(expected[key].shape)} in the model")
    if strict:
        missing = sorted(set(expected) - set(rest))
        unexpected = sorted(set(rest) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint does not match the model: missing keys {missing[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                                  f"{' ...' if len(unexpected) > 10 else ''}")
    # 2. Apply.
    for name, (packed, state, bias) in replacements.items():
        layer = FP4Linear(packed=packed.to(device), state=state.to(device),
                          bias=None if bias is None else bias.to(device))
        _set_submodule(model, name, layer)
    if rest:
        moved = {}  # by identity, so a tensor stored once for several keys (tied weights) stays one tensor
        for value in rest.values():
            if id(value) not in moved:
                moved[id(value)] = value.to(device)
        model.load_state_dict({k: moved[id(v)] for k, v in rest.items()}, strict=False, assign=True)
    return model


def save_pretrained(model: nn.Module, directory: PathLike) -> None:
    """Saves a Hugging Face model converted to fp4 as a model folder: its config.json (with the
    bitsandbytes quantization_config, so the folder also loads with Hugging Face + bitsandbytes) and
    model.safetensors in bitsandbytes' keys. Reload it with `fp4.from_pretrained(directory)`."""
    _check_model(model)
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("model: expected a Hugging Face PreTrainedModel (it has no .config); use fp4.save for others")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"directory: {os.fspath(directory)!r} is a file, not a folder")
    os.makedirs(directory, exist_ok=True)  # (only once the model is known to be one this can save)
    layers = [m for m in model.modules() if isinstance(m, FP4Linear)]
    if layers:
        first = layers[0]
        config.quantization_config = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": first.quant_type, "bnb_4bit_use_double_quant": first.nested_absmax is not None,
            "bnb_4bit_compute_dtype": str(first.weight_dtype).replace("torch.", ""),
            "bnb_4bit_quant_storage": "uint8"}
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    save(model, os.path.join(directory, WEIGHTS_NAME))


def from_pretrained(directory: PathLike, model_class=None, device: Optional[Union[str, torch.device]] = None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Loads a Hugging Face model folder whose weights are 4-bit (written by `fp4.save_pretrained`,
    or by Hugging Face's `save_pretrained` of a bitsandbytes 4-bit model) into FP4Linear layers,
    without bitsandbytes. `model_class`: a transformers class (default AutoModelForCausalLM);
    `dtype`: the dtype of the non-quantized weights (default: the config's)."""
    import transformers

    if not os.path.isdir(directory):  # (a local folder: the Hub's repo-id message would only confuse)
        raise FileNotFoundError(f"directory: no such folder {os.fspath(directory)!r}")
    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is built unquantized; fp4.load swaps the layers
    model_class = model_class or transformers.AutoModelForCausalLM
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _parameters_on_meta():
        model = model_class.from_config(config, dtype=dtype)
    path = os.path.join(directory, WEIGHTS_NAME)
    entries = _read(path)
    load_state_dict(model, entries, device=device or "cpu", strict=False)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover and hasattr(model, "tie_weights"):
        model.tie_weights()
        leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: holds no values for {leftover[:10]}")
    generation = os.path.join(directory, "generation_config.json")
    if os.path.exists(generation):
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model.eval()


# ---- helpers ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Builds modules with their parameters on the meta device (no memory, no init cost) while
    buffers stay real: non-persistent buffers (e.g. rotary tables) are not in checkpoints, so they
    must be computed by the constructors as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            moved = module._parameters[name].to("meta")
            module._parameters[name] = type(param)(moved, requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read(path: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such checkpoint {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            entries = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own types for truncated or malformed files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    aliases = json.loads(metadata.get("fp4.aliases", "{}"))
    for alias, original in aliases.items():
        if original not in entries:
            raise CheckpointError(f"{path}: {alias} is stored as an alias of {original}, which is missing")
        entries[alias] = entries[original]
    return entries


def _unique_tensors(state: Dict[str, torch.Tensor]):
    """CPU copies of the state for safetensors, which refuses tensors that share memory: a tensor
    that is the same view as an earlier one (tied weights) becomes an alias of its key; one that
    shares storage otherwise is copied apart."""
    views, storages, tensors, aliases = {}, set(), {}, {}
    for key, value in state.items():
        value = value.detach()
        if value.numel():
            view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                    tuple(value.stride()), value.dtype)
            if view in views:
                aliases[key] = views[view]
                continue
            views[view] = key
        value = value.contiguous().cpu()
        if value.numel():
            storage = value.untyped_storage().data_ptr()
            if storage in storages:
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    return tensors, aliases


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _get_submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
