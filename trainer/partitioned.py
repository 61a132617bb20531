"""Read and write the weights of a module whose parameters may be ZeRO-3 partitioned.

Each works one submodule at a time (its own parameters, gathered whole for that moment), so
memory stays bounded by the largest layer. Plain modules (evaluation, exports loaded for
inference) need no gathering and the same code serves them without importing DeepSpeed.
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from data_shards.errors import ValleyForgeError
from trainer.ranks import rank


def _params_by_module(module: nn.Module) -> Iterator[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """(prefix, its own parameters) for every submodule; a parameter shared by several (an LLM's
    output head tied to its embeddings) only under the first, the name `named_parameters` gives it."""
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        params = [(name, p) for name, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        yield prefix, params


def _whole(params: list[tuple[str, nn.Parameter]], modifier_rank: int | None):
    """ZeRO-3 partitioned parameters gathered whole for the block; plain ones are whole already."""
    if not any(hasattr(p, "ds_id") for _, p in params):
        return contextlib.nullcontext()
    import deepspeed  # only partitioned parameters need it

    return deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=modifier_rank)


def init_random_weights(module: nn.Module, std: float, seed: int) -> None:
    """Deterministic random init: matrices and embeddings ~ N(0, std), biases and offsets (a
    parameter named `*_offset`) 0, norm scales 1.

    Seeded per submodule by name, so the result does not depend on rank count or build order.
    """
    for prefix, params in _params_by_module(module):
        if not params:
            continue
        with _whole(params, modifier_rank=0):
            if not rank() == 0:
                continue
            generator = torch.Generator().manual_seed(seed ^ zlib.crc32(prefix.encode()))
            for name, param in params:
                with torch.no_grad():
                    if name.endswith(("bias", "_offset")):
                        param.zero_()
                    elif param.ndim == 1 and name == "weight":
                        param.fill_(1.0)
                    else:
                        param.copy_(torch.randn(param.shape, generator=generator) * std)


class SafetensorsFolder:
    """All tensors of the *.safetensors files in a folder, read lazily by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ValleyForgeError(f"{self.folder}: no *.safetensors weights found")
        self._where = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                self._where.update({key: file for key in f.keys()})

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)


def load_weights(module: nn.Module, source: SafetensorsFolder) -> None:
    """Copy `source` into `module` by parameter name.

    Every parameter must be present. An embedding-like tensor with fewer rows than the module's
    (the tokenizer gained tokens, e.g. the visual token) fills the first rows; the rest keep
    their initialisation. Tensors the module has no place for (a full CLIP checkpoint's text
    tower) are ignored.
    """
    expected = {name for name, _ in module.named_parameters()}
    missing = sorted(expected - source.keys())
    if missing:
        raise ValleyForgeError(f"{source.folder}: weights missing for {len(missing)} parameters, e.g. {missing[:3]}")
    for prefix, params in _params_by_module(module):
        with _whole(params, modifier_rank=0):
            if rank() == 0:
                for name, param in params:
                    _copy_into(param, source.get(f"{prefix}.{name}" if prefix else name), source.folder, name)
    for key, buffer in module.named_buffers():
        if key in source.keys():
            with torch.no_grad():
                buffer.copy_(source.get(key))


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, folder: Path, name: str) -> None:
    with torch.no_grad():
        if tensor.shape == param.shape:
            param.copy_(tensor)
        elif tensor.ndim == param.ndim and tensor.shape[1:] == param.shape[1:] and tensor.shape[0] < param.shape[0]:
            param[: tensor.shape[0]].copy_(tensor)
        else:
            raise ValleyForgeError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
            )


def gather_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (CPU tensors); empty on other ranks. All ranks must call."""
    state = {}
    for prefix, params in _params_by_module(module):
        with _whole(params, modifier_rank=None):
            if rank() == 0:
                for name, param in params:
                    state[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
    if rank() == 0:
        for name, buffer in module.named_buffers():
            state[name] = buffer.detach().cpu().clone()
    return state
