"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX/`` holding ``weights.safetensors`` (the
subspace's state dict), ``optimizer.safetensors`` (momentum buffers by parameter index) and
``state.json`` (epoch, step, RNG state, config), and ``ema.safetensors`` (the weight average,
``optim.ema``) while one is kept apart from the weights. It is written under a temporary name and renamed
into place; ``checkpoints/latest.json`` is replaced last, so a run killed at any instant resumes
from the last complete checkpoint. Both tensor files carry a digest of their data (``lcs.files``):
a damaged checkpoint is detected on load, and ``load_latest_intact`` falls back to the newest
intact one (``run.keep_checkpoints`` keep that many), saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LcsError, state_dict_error
from ..files import DamagedFileError, atomic_dir, dumps_json, load_tensors, save_tensors, write_json
from ..layers.bn_stats import ROW_BUFFERS

EMA_FILE = "ema.safetensors"

__all__ = ["EMA_FILE", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_weights", "list_checkpoints",
           "load_latest_intact"]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{idx}.{k}"] = v.detach().cpu().contiguous()
    return out


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2, tag: str = "",
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint for ``state["step"]`` atomically and prune old ones beyond ``keep``.
    ``tag``: a suffix for a second checkpoint of the same step (it sorts after the first, which
    stays intact until the new one is complete). ``ema``: the weight average's tensors."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:08d}" + (f"_{tag}" if tag else "")
    final = root / name
    with atomic_dir(final) as tmp:
        save_tensors(model.state_dict(), tmp / "weights.safetensors")
        save_tensors(_optimizer_tensors(opt), tmp / "optimizer.safetensors")
        if ema is not None:
            save_tensors(ema, tmp / EMA_FILE)
        full = {**state, "torch_rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(dumps_json(full))
    write_json(root / "latest.json", {"checkpoint": name})
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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, newest first (the one ``latest.json`` names first)."""
    latest = latest_checkpoint(run_dir)
    others = sorted((p for p in latest.parent.glob("step_*") if p.is_dir() and p != latest), reverse=True)
    return [latest, *others]


def load_latest_intact(run_dir: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer | None = None,
                       *, new_rows: bool = False) -> tuple[Path, dict[str, Any]]:
    """Load the newest checkpoint that is intact; a damaged one is reported on stderr and skipped.
    Raises the newest damage error when none is intact. ``new_rows``: see ``load_weights``. The
    state's ``ema_tensors`` holds the weight average where the checkpoint has one (digest-checked)."""
    first: DamagedFileError | None = None
    candidates = list_checkpoints(run_dir)
    for i, ckpt in enumerate(candidates):
        try:
            state = load_checkpoint(ckpt, model, opt, new_rows=new_rows)
        except DamagedFileError as e:
            first = first or e
            if i + 1 < len(candidates):
                print(f"lcs: {e}; trying the previous checkpoint {candidates[i + 1].name}", file=sys.stderr)
            continue
        if first is not None:
            print(f"lcs: using the intact checkpoint {ckpt.name} (step {state.get('step')})", file=sys.stderr)
        return ckpt, state
    assert first is not None
    raise DamagedFileError(str(first) if len(candidates) == 1 else f"{first} (no earlier intact checkpoint is kept)")


def load_weights(path: Path, model: nn.Module, *, new_rows: bool = False) -> bool:
    """Load ``weights.safetensors`` into ``model`` (strict), with one-line errors. ``new_rows``: a
    BatchNorm's statistics rows stored in another number than the model has (``method.bn_stats_bins``
    changed since) start from the stored rows' mean, for the final BatchNorm pass to re-estimate;
    returns whether any did."""
    tensors, _ = load_tensors(path)
    reset = False
    if new_rows:
        own = model.state_dict()
        for key, value in tensors.items():
            mine = own.get(key)
            if (key.endswith(ROW_BUFFERS) and mine is not None and value.dim() == 2 == mine.dim()
                    and value.shape[1] == mine.shape[1] and value.shape[0] != mine.shape[0]):
                # every new row starts from the stored rows' mean: a row the pass cannot reach keeps that
                tensors[key], reset = value.mean(0, keepdim=True).expand_as(mine).clone(), True
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise LcsError(f"checkpoint {path} does not match the model: {state_dict_error(e)}") from None
    return reset


def load_checkpoint(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None, *,
                    new_rows: bool = False) -> dict[str, Any]:
    """Restore weights (and optimizer state, RNG) from a checkpoint directory; returns its state, with
    ``bn_rows_reset`` true where ``new_rows`` left statistics rows to re-estimate (``load_weights``)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"checkpoint {ckpt}/state.json is corrupted ({e})") from None
    state["bn_rows_reset"] = load_weights(ckpt / "weights.safetensors", model, new_rows=new_rows)
    state["ema_tensors"] = load_tensors(ckpt / EMA_FILE)[0] if (ckpt / EMA_FILE).is_file() else None
    if opt is not None:
        tensors, _ = load_tensors(ckpt / "optimizer.safetensors")
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
