"""Build the pieces of a run from its config, for training and for evaluating or exporting a
finished run directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .. import models
from ..errors import LcsError, state_dict_error
from ..subspace import Subspace, convert
from .checkpoint import load_latest_intact
from .config import Config, config_from_dict

__all__ = ["build_subspace", "load_init", "open_data", "split_seed", "load_run", "arch_meta", "cache_dir",
           "resolve_device"]


def cache_dir() -> str:
    return os.environ.get("LCS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lcs")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LcsError("run.device=cuda but no CUDA device is available")
    return torch.device(name)


def arch_meta(cfg: Config) -> dict:
    """How to rebuild the plain architecture by name (stored in exported artifacts)."""
    return {"name": cfg.model.name, "kwargs": {"num_classes": cfg.model.num_classes, "norm": cfg.model.norm}}


def load_init(model: torch.nn.Module, path: str) -> None:
    """Load a trained plain model into ``model`` before it is converted: a plain safetensors state
    dict (a user's) or an lcs network artifact (``lcs export``, e.g. of a dense run). Never unpickles."""
    from ..deploy.artifact import FORMAT, load_compressed
    from ..files import DamagedFileError, load_tensors, read_safetensors_metadata

    if not os.path.isfile(path):
        raise LcsError(f"--init: no such file: {path}")
    try:
        meta = read_safetensors_metadata(path)  # a pickle or any other non-safetensors file fails here
    except DamagedFileError:
        raise LcsError(f"--init: {path} is not a safetensors file (lcs never unpickles; save a state dict with "
                       f"safetensors.torch.save_file(model.state_dict(), PATH))") from None
    if "lcs" in meta:
        import copy
        import json

        header = json.loads(meta["lcs"])
        if header.get("format") != FORMAT:
            raise LcsError(f"--init: {path} holds {header.get('format')!r}, not one network (export one α of a "
                           f"run, e.g. a dense run at α=1)")
        state = load_compressed(path, model=copy.deepcopy(model), kernels="dense").state_dict()
    else:
        state, _ = load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LcsError(f"--init: {path} does not match {type(model).__name__} "
                       f"(model.name / model.norm / num_classes?): {state_dict_error(e)}") from None


def build_subspace(cfg: Config, *, init: bool = True) -> Subspace:
    """The plain model from the registry (seeded from ``model.init`` when set and ``init``),
    converted for the config's regime and method."""
    if cfg.model.num_classes is None:
        raise LcsError("model.num_classes is not resolved (it comes from the data)")
    arch = arch_meta(cfg)
    zero_init = {"zero_init_residual": True} if cfg.model.zero_init_residual else {}
    model = models.create(arch["name"], **arch["kwargs"], **zero_init)
    if init and cfg.model.init:
        load_init(model, cfg.model.init)
    sub = convert(model, cfg.regime_config())
    sub.input_shape = (3, cfg.data.image_size, cfg.data.image_size)
    return sub


def split_seed(cfg: Config) -> int:
    """The seed of the validation split: ``data.split_seed``, else ``run.seed``."""
    return cfg.run.seed if cfg.data.split_seed is None else cfg.data.split_seed


def open_data(cfg: Config, root: str | None = None, name: str | None = None):
    """Load the configured data set (optionally another one, for evaluation)."""
    from ..data import load_data

    key = name or cfg.data.name
    data = load_data(key, root if (name or root is not None) else cfg.data.root,
                     val_fraction=cfg.data.val_fraction, seed=split_seed(cfg), image_size=cfg.data.image_size,
                     cache_dir=cache_dir() if cfg.data.cache else None,
                     pipeline=cfg.data.pipeline if key == "folder" else "auto", workers=cfg.data.workers)
    # another data set (evaluation only) is never augmented: the run's crop and flips are not its settings
    return data if name else with_augmentation(data, cfg.data.crop_pad, cfg.data.flip)


def with_augmentation(data, pad: int | None, flip: str = "random"):
    """``data`` with the random crop's zero padding set to ``pad`` pixels (None: the data's own) and the
    flips drawn ``flip`` ("random" or "alternate").

    Why knobs: a small network trained for a few epochs underfits, and a milder crop is less to fit.
    """
    from ..data.base import ImageData

    if pad is None and flip == "random":
        return data
    if not isinstance(data, ImageData):
        raise LcsError("data.crop_pad and data.flip apply to in-memory data; streamed folders take "
                       "ImageNet's random resized crops (set data.pipeline=memory, or drop those keys)")
    return dataclasses.replace(data, pad=data.pad if pad is None else int(pad), flip=flip)


def load_run(run_dir: str | os.PathLike) -> tuple[Config, Subspace, dict]:
    """(config, subspace with the latest weights, checkpoint state) of a run directory."""
    import yaml

    run = Path(run_dir)
    if not run.is_dir():
        raise LcsError(f"run directory not found: {run_dir}")
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text())
    except FileNotFoundError:
        raise LcsError(f"{run_dir} has no config.yaml: not an lcs run directory") from None
    except yaml.YAMLError as e:
        raise LcsError(f"{run}/config.yaml is not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = config_from_dict(raw).validate()
    sub = build_subspace(cfg, init=False)  # the checkpoint overwrites every tensor
    _, state = load_latest_intact(run, sub.model)  # a damaged newest checkpoint falls back, saying so
    ema = state.pop("ema_tensors", None)
    if ema is not None:  # an unfinished optim.ema run: its average is what the trainer validates and ships
        try:
            sub.model.load_state_dict(ema, strict=True)
        except RuntimeError as e:
            raise LcsError(f"{run}: the checkpoint's weight average does not match the model: "
                           f"{state_dict_error(e)}") from None
    sub.model.eval()
    return cfg, sub, state
