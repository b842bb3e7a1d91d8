"""The one typed configuration. Dataclass defaults are the only defaults.

Flow: dataclass defaults → YAML file (``--config``) → ``--set section.key=value`` → validation.
The resolved config is written to the run directory as ``config.yaml``. The defaults are tuned for
the embedded ``digits`` data (a 2-minute CPU demo); ``configs/*.yaml`` hold recipes for CIFAR-10.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import LcsError
from ..regimes import REGISTRY, RegimeConfig, record_of
from ..regimes.base import check_whole

__all__ = ["default_norm", "Config", "DataConfig", "ModelConfig", "MethodConfig", "OptimConfig", "RunConfig",
           "load_config", "apply_overrides", "config_to_dict", "config_from_dict", "save_config"]

DATASETS = ("digits", "cifar10", "folder")
# digits are 8×8: 16×16 gives the network 4×4 maps before pooling at a quarter of the 32×32 cost.
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "folder": 32}


def default_norm(regime: str, method: str) -> str | None:
    """The norm a regime's method trains with by default (``Regime.default_norms``)."""
    return record_of(regime).default_norm(method) if regime in REGISTRY else None


PIPELINES = ("auto", "memory", "stream")  # = lcs.data.stream.PIPELINES (not imported: config stays light)
AMP_MODES = ("bf16",)  # and None (none): no autocast
NORMS = ("gn", "in", "ln", "bn")
FLIPS = ("random", "alternate")  # ImageData.flip; "alternate" is read by lcs.data.batches
SCHEDULES = ("cosine", "linear")  # the LR decay after the warm-up (loop.lr_at)


@dataclass
class DataConfig:
    name: str = "digits"  # digits (embedded) | cifar10 (python batches) | folder (root/<class>/*.jpg)
    root: str | None = None  # dataset folder (cifar10, folder)
    val_fraction: float = 0.1  # held out from the training data when there is no val split
    # seeds the validation split; None = run.seed. Keep a dense model's split when a subspace trained
    # from it (--init) changes run.seed: otherwise its validation images were the model's training images
    split_seed: int | None = None
    image_size: int | None = None  # square size images are resized to; None = the data's default (below)
    batch_size: int = 32  # global batch size
    augment: bool = True  # random crop (pad = crop_pad) + flip where the data allows
    # zero padding of the random crop, in pixels; None = the data's own (image_size / 8: 4 on CIFAR-10).
    # In-memory data only (streamed folders take ImageNet's random resized crops)
    crop_pad: int | None = None
    # horizontal flips: random (a coin per image and epoch) | alternate (a seeded coin in the first epoch,
    # then the opposite of the last: every image both ways every two epochs). In-memory data only
    flip: str = "random"
    cache: bool = True  # cache decoded folders in $LCS_CACHE or ~/.cache/lcs (safetensors)
    # folder: memory (decode once, cache) | stream (DataLoader workers, ImageNet crops) | auto (stream from
    # image_size 64 on, or when the decoded images would exceed 4 GiB)
    pipeline: str = "auto"
    workers: int | None = None  # stream: DataLoader processes per training process; None = min(8, CPUs/process)


@dataclass
class ModelConfig:
    name: str = "cpreresnet20"
    norm: str | None = None  # gn | in | ln | bn; None = the method's default (the regime record's default_norms)
    num_classes: int | None = None  # None = from the data
    # a trained plain model (safetensors state dict, or an `lcs export` network) that seeds the point,
    # or both endpoints of the line (line_init becomes copy), before the subspace trains
    init: str | None = None
    # cpreresnet20: each residual block's last conv starts at zero (the block starts as its shortcut);
    # the ResNets always zero their blocks' last norm scale. Training-time init only: not stored
    zero_init_residual: bool = False


@dataclass
class MethodConfig:
    regime: str = "unstructured"  # unstructured | structured | quantized | sparse_quantized (lcs.regimes)
    # unstructured, quantized: lcs_l | lcs_p | target; structured: lcs_l | lcs_p | us | ns | lec;
    # sparse_quantized: lcs_l | lcs_p
    name: str = "lcs_l"
    d_min: float = 0.025  # unstructured, sparse_quantized: lowest density of the subspace (97.5 % sparsity)
    target: float | None = None  # the target level of the 'target' baseline (a density, or bits when quantized)
    b_min: int = 3  # quantized, sparse_quantized: fewest bits of the subspace
    b_max: int = 8  # quantized, sparse_quantized: most bits
    w_min: float = 0.25  # structured: narrowest width factor
    w_max: float = 1.0  # structured: widest width factor
    line_scope: str = "norm"  # structured LCS+L: which tensors are lines (norm | all)
    sandwich_random: int = 2  # structured sandwich rule: random widths per step besides both ends
    ns_widths: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # NS baseline: the fixed width list
    l1: float = 1e-5  # LEC baseline: L1 weight on norm scales
    # compression warm-up, fraction of all steps; None = the method's (SPEC: 80 %; sparsity × bits LCS+P: 50 %)
    warmup: float | None = None
    beta: float = 1.0  # weight of the cos² regularizer (lines only)
    endpoint_prob: float = 0.5  # LCS+L: probability of sampling an endpoint
    # LCS+L / LCS+P: interior α drawn uniform (SPEC) or log-uniform (equal visits to log-spaced BN statistics rows)
    alpha_dist: str = "uniform"
    line_init: str = "independent"  # independent | copy (second endpoint from the first)
    # with BatchNorm, running statistics per level bin (0: one shared set): unstructured per log-spaced
    # bin of α, structured LCS+L / LCS+P per width bin plus both ends; the baselines always keep one
    bn_stats_bins: int = 0
    # BatchNorm: after the last step, replace each stored statistics row by its average over this many
    # training batches (augmented as in training) with the final weights (lcs.train.bn_pass);
    # 0 keeps the running averages
    bn_final_batches: int = 0


@dataclass
class OptimConfig:
    epochs: int = 30
    lr: float = 0.1  # peak learning rate (SGD)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear LR warm-up, then decay to 0 (schedule)
    schedule: str = "cosine"  # cosine | linear: the decay's shape after the warm-up
    label_smoothing: float = 0.0
    # decay of an exponential moving average of the weights, validated each epoch and shipped at the
    # end (lcs.train.ema); 0 = off, the live weights ship
    ema: float = 0.0


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)
    amp: str | None = None  # none | bf16: forward + loss under torch.autocast in bfloat16 (never on by default)
    channels_last: bool | None = None  # None = on for CUDA, and on CPU for BatchNorm models (channels_last_by_default)
    threads: int | None = None  # torch intra-op threads; None = torch's default
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm progress bar


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def regime_config(self) -> RegimeConfig:
        """The regime config that ``lcs.convert`` takes, built by the regime from the method section."""
        return record_of(self.method.regime).settings(self.method, self.method.name)

    def validate(self) -> Config:
        d, o, m = self.data, self.optim, self.method
        if d.name not in DATASETS:
            raise LcsError(f"data.name must be one of {', '.join(DATASETS)}, got {d.name!r}")
        if d.name != "digits" and not d.root:
            raise LcsError(f"data {d.name!r} needs a folder: --data-root PATH")
        _check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "in (0, 1)")
        _check(d.split_seed is None or d.split_seed >= 0, "data.split_seed", d.split_seed, ">= 0 (or none)")
        if d.root:
            d.root = os.path.abspath(os.path.expanduser(d.root))
        _check(not self.model.zero_init_residual or self.model.name == "cpreresnet20", "model.zero_init_residual",
               self.model.zero_init_residual, "cpreresnet20 only (the ResNets zero their last norm scale already)")
        if self.model.init:
            self.model.init = os.path.abspath(os.path.expanduser(self.model.init))
            m.line_init = "copy"  # both endpoints start from the trained model
        if self.model.norm is None:
            self.model.norm = default_norm(m.regime, m.name)
        if d.image_size is None:
            d.image_size = DEFAULT_IMAGE_SIZE[d.name]
        _check(d.image_size >= 8, "data.image_size", d.image_size, ">= 8")
        _check(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
        if d.flip not in FLIPS:
            raise LcsError(f"data.flip must be one of {', '.join(FLIPS)}, got {d.flip!r}")
        _check(d.crop_pad is None or 0 <= d.crop_pad < d.image_size, "data.crop_pad", d.crop_pad,
               f"in [0, image_size={d.image_size}) (or none: the data's own)")
        _check(o.epochs >= 1, "optim.epochs", o.epochs, ">= 1")
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)")
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        _check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", o.warmup_epochs, "in [0, epochs]")
        if o.schedule not in SCHEDULES:
            raise LcsError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
        _check(0 <= o.label_smoothing < 1, "optim.label_smoothing", o.label_smoothing, "in [0, 1)")
        _check(0 <= o.ema < 1, "optim.ema", o.ema, "in [0, 1) (0: off)")
        if m.regime not in REGISTRY:
            raise LcsError(f"method.regime must be one of {', '.join(REGISTRY)}, got {m.regime!r}")
        record = REGISTRY[m.regime]
        if m.name not in record.methods:
            raise LcsError(f"method.name must be one of {', '.join(record.methods)} for regime "
                           f"{m.regime!r}, got {m.name!r}")
        if m.warmup is None:
            m.warmup = record.methods[m.name].warmup
        _check(0 <= m.warmup <= 1, "method.warmup", m.warmup, "in [0, 1]")
        _check(m.beta >= 0, "method.beta", m.beta, ">= 0")
        _check(0 <= m.endpoint_prob <= 1, "method.endpoint_prob", m.endpoint_prob, "in [0, 1]")
        _check(m.alpha_dist in ("uniform", "log"), "method.alpha_dist", m.alpha_dist, "uniform or log")
        check_whole(m.bn_final_batches, "method.bn_final_batches")
        if self.model.norm not in NORMS:
            raise LcsError(f"model.norm must be gn, in, ln or bn, got {self.model.norm!r}")
        if record.norms is not None and self.model.norm not in record.norms:
            raise LcsError(f"the {m.regime} regime accepts model.norm in {', '.join(record.norms)}, not "
                           f"{self.model.norm!r}{record.notes.get('norm', '')}")
        if m.line_init not in ("independent", "copy"):
            raise LcsError(f"method.line_init={m.line_init!r} is invalid: must be independent or copy")
        regime = self.regime_config()  # the regime checks its own keys, naming them (method.d_min, ...)
        if record.methods[m.name].sampler == "target":
            if m.target is None:
                raise LcsError("method 'target' needs a target level: --set method.target=0.1 (quantized: bits, "
                               "e.g. method.target=4)")
            try:
                regime.alpha_of(m.target)
            except LcsError as e:
                raise LcsError(f"method.target={m.target!r} is invalid: {e}") from None
        _check(d.pipeline in PIPELINES, "data.pipeline", d.pipeline, f"one of {', '.join(PIPELINES)}")
        if d.pipeline == "stream" and d.name != "folder":
            raise LcsError(f"data.pipeline=stream reads image folders only (data.name=folder), not {d.name!r}")
        _check(d.workers is None or d.workers >= 0, "data.workers", d.workers, ">= 0 (0: decode in-process)")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.run.device) is not None, "run.device", self.run.device,
               "auto, cpu, cuda or cuda:N")
        _check(self.run.amp is None or self.run.amp in AMP_MODES, "run.amp", self.run.amp,
               f"none or {', '.join(AMP_MODES)}")
        _check(self.run.checkpoint_every >= 1, "run.checkpoint_every", self.run.checkpoint_every, ">= 1")
        _check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints", self.run.keep_checkpoints, ">= 1")
        return self


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise LcsError(f"{key}={value!r} is invalid: must be {want}")


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or fail naming the key."""
    hint = annotation
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise LcsError(f"{key} cannot be empty")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if typing.get_origin(hint) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise LcsError(f"{key}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    sections = _sections(cfg)
    if section not in sections or not key:
        raise LcsError(f"unknown config key {dotted!r}: keys look like section.key with section one of "
                       f"{', '.join(sections)}")
    obj = sections[section]
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise LcsError(f"unknown config key {dotted!r}; {section} has: {', '.join(hints)}")
    setattr(obj, key, _coerce(value, hints[key], dotted))


def config_from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """A Config from a nested dict (YAML), rejecting unknown sections and keys."""
    cfg = base or Config()
    if not isinstance(raw, dict):
        raise LcsError("a config file must hold a mapping of sections (data, model, method, optim, run)")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise LcsError(f"config section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    return cfg


def apply_overrides(cfg: Config, pairs: list[str]) -> Config:
    """Apply ``section.key=value`` strings (``--set``)."""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise LcsError(f"--set expects key=value, got {pair!r}")
        _set(cfg, key.strip(), value.strip())
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then overrides, then validation."""
    cfg = Config()
    if path is not None:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise LcsError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise LcsError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        config_from_dict(raw, cfg)
    apply_overrides(cfg, overrides or [])
    return cfg.validate()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    import yaml

    from ..files import atomic_write

    with atomic_write(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
