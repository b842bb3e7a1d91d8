"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX/`` holding ``weights.safetensors`` (the
subspace's state dict), ``optimizer.safetensors`` (momentum buffers by parameter index) and
``state.json`` (epoch, step, RNG state, config). It is written under a temporary name and renamed
into place; ``checkpoints/latest.json`` is replaced last, so a run killed at any instant resumes
from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import LcsError

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_weights"]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{idx}.{k}"] = v.detach().cpu().contiguous()
    return out


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``state["step"]`` atomically and prune old ones beyond ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              tmp / "weights.safetensors")
    save_file(_optimizer_tensors(opt), tmp / "optimizer.safetensors")
    rng = torch.get_rng_state()
    full = {**state, "torch_rng": rng.tolist()}
    (tmp / "state.json").write_text(json.dumps(full))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_json(root / "latest.json", {"checkpoint": name})
    old = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest.json"
    if not pointer.is_file():
        raise LcsError(f"no checkpoint in {run_dir} (was it trained with `lcs train --out {run_dir}`?)")
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LcsError(f"{pointer} is corrupted") from None
    path = root / name
    if not path.is_dir():
        raise LcsError(f"{pointer} points at a missing checkpoint {name}")
    return path


def load_weights(path: Path, model: nn.Module) -> None:
    """Load ``weights.safetensors`` into ``model`` (strict), with one-line errors."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LcsError(f"checkpoint {path} is corrupted or truncated ({e})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise LcsError(f"checkpoint {path} does not match the model: {str(e).splitlines()[0]}") from None


def load_checkpoint(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore weights (and optimizer state, RNG) from a checkpoint directory; returns its state."""
    load_weights(ckpt / "weights.safetensors", model)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LcsError(f"checkpoint {ckpt}/state.json is corrupted ({e})") from None
    if opt is not None:
        try:
            tensors = load_file(ckpt / "optimizer.safetensors")
        except (SafetensorError, OSError, ValueError) as e:
            raise LcsError(f"checkpoint {ckpt}/optimizer.safetensors is corrupted ({e})") from None
        sd = opt.state_dict()
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = value
        sd["state"] = per_param
        opt.load_state_dict(sd)
    if "torch_rng" in state:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state
