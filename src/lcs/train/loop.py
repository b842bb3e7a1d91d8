"""The one training loop, for every regime and method.

Each step: ask the method's sampler for this step's α's, set each on the whole model (with the
schedule's compression level), forward, sum the losses and the method's extra terms, one
backward, one SGD step. Nothing in the loop depends on which method runs.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import ImageData, num_batches, train_batches
from ..data.loaders import LoaderData
from ..errors import LcsError
from ..eval.evaluate import evaluate_accuracy
from ..files import dumps_json
from ..regimes import record_of
from ..subspace import Subspace
from .bn_pass import RowWarmStart, estimate_bn_stats
from .checkpoint import load_latest_intact, save_checkpoint
from .config import Config, save_config
from .distributed import init_distributed
from .ema import WeightEMA
from .methods import Method, build_method
from .run import build_subspace, open_data, resolve_device

__all__ = ["Trainer", "DivergedError", "channels_last_by_default", "lr_at"]

_STEP_SEED = 1_000_003


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str = "cosine") -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then decay to 0 at ``total_steps``: cosine,
    or linear (which budgeted-training studies found at least as good when the budget is short)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return peak * (1.0 - progress)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


class DivergedError(LcsError):
    """The loss became NaN or infinite: training stops at that step, before the update."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: the loss is {loss}; the last checkpoint is kept "
                         f"unchanged (lower optim.lr, or check the data)")
        self.step = step


def channels_last_by_default(device: torch.device, norm: str | None) -> bool:
    """Channels-last memory format on CUDA (cuDNN's preferred layout), and on CPU for BatchNorm
    networks, whose oneDNN convolutions and norms run faster in it. Measured here
    (``benchmarks/channels_last.py``: cPreResNet20, batch 128, training steps, one thread, two runs):
    BatchNorm 1.39–1.41× (LCS+L unstructured), 1.37–1.40× (dense), 1.16–1.18× (LCS+L quantized),
    1.54–1.65× (LCS+P structured); at two threads 1.31× / 1.18×. GroupNorm networks ran slower in it
    on CPU (0.77–0.85×), so they stay contiguous."""
    return device.type == "cuda" or norm == "bn"


class Trainer:
    """Train a compressible subspace described by ``cfg`` into ``out_dir``.

    Args:
        cfg: a validated Config.
        out_dir: the run directory (config.yaml, metrics.jsonl, checkpoints/).
        data: pre-loaded data, or the user's own DataLoaders as ``lcs.LoaderData(train, val,
            num_classes)`` (any Dataset and transforms; resume and DDP guarantees in ``lcs.data.loaders``);
            by default loaded from the config.
        resume: continue from the latest checkpoint in ``out_dir``.
    """

    def __init__(self, cfg: Config, out_dir: str | Path, *, data: ImageData | LoaderData | None = None,
                 resume: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = resolve_device(cfg.run.device)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        # bf16 autocast only when asked (CPU too, where it is rarely faster); channels-last where the
        # kernels want it (channels_last_by_default) unless set either way.
        self.amp = cfg.run.amp == "bf16"
        if self.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise LcsError("run.amp=bf16 but this GPU has no bfloat16 support; use run.amp=none")
        self.channels_last = (channels_last_by_default(self.device, cfg.model.norm) if cfg.run.channels_last is None
                              else cfg.run.channels_last)
        self.data = data if data is not None else open_data(cfg)
        cfg.model.num_classes = cfg.model.num_classes or self.data.num_classes
        if cfg.model.num_classes != self.data.num_classes:
            raise LcsError(f"model.num_classes={cfg.model.num_classes} but the data has "
                           f"{self.data.num_classes} classes")
        torch.manual_seed(cfg.run.seed)
        self.sub: Subspace = build_subspace(cfg, init=not resume)  # resuming: the checkpoint has every tensor
        self.model = self.sub.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net: torch.nn.Module = self.model  # what the forward pass runs: the model or its DDP wrapper
        if self.dist.enabled:
            if cfg.data.batch_size % self.dist.world_size:
                raise LcsError(f"data.batch_size={cfg.data.batch_size} must be divisible by the "
                               f"{self.dist.world_size} processes")
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None)
        if hasattr(self.data, "steps_per_epoch"):  # the user's DataLoaders set their own batches
            self.steps_per_epoch = self.data.steps_per_epoch()
        else:
            self.steps_per_epoch = num_batches(len(self.data.train), cfg.data.batch_size)
        if self.steps_per_epoch == 0:
            raise LcsError(f"batch_size={cfg.data.batch_size} is larger than the training set "
                           f"({len(self.data.train)} images)")
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.method: Method = build_method(cfg.method, cfg.method.regime, cfg.method.name, self.sub.config,
                                           self.total_steps)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                   nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
                                   weight_decay=cfg.optim.weight_decay)
        self.step = 0
        # the weight average (optim.ema), kept apart until the last step, then copied into the model
        self.ema = WeightEMA(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.ema_applied = False
        self.bn_final_done = 0  # batches per row of the final BatchNorm pass already in the weights
        self.bn_rows = RowWarmStart(self.sub)  # statistics rows: their own first batches, then one set's rate
        self.record = record_of(cfg.method.regime)
        self._phase: bool | None = None  # the regime's phase hook as last switched (None: not yet)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            # with a final pass configured, statistics rows of another number (bn_stats_bins changed)
            # are re-estimated by it: a trained subspace gets finer rows without retraining
            _, state = load_latest_intact(self.out, self.model, self.opt, new_rows=cfg.method.bn_final_batches > 0)
            self.step = int(state["step"])
            self._restore_ema(state)
            self.bn_rows.load(state, rows_reset=state["bn_rows_reset"])
            self.bn_final_done = 0 if state["bn_rows_reset"] else int(state.get("bn_final_batches", 0))
            if state["bn_rows_reset"] and self.dist.is_main:
                print(f"the checkpoint's BatchNorm statistics rows differ from method.bn_stats_bins="
                      f"{cfg.method.bn_stats_bins}: the final BatchNorm pass re-estimates them", flush=True)
            if self.dist.is_main:
                epoch = self.step // self.steps_per_epoch
                pending = cfg.method.bn_final_batches and self.bn_final_done != cfg.method.bn_final_batches
                print(f"resuming from step {self.step} (epoch {epoch} of {cfg.optim.epochs})" if
                      self.step < self.total_steps else
                      f"the run in {self.out} is finished ({cfg.optim.epochs} epochs, step {self.step}): "
                      + ("only the final BatchNorm pass is left" if pending else
                         "nothing to train; raise --epochs to train further"), flush=True)
            if self.dist.is_main:
                self._truncate_log(self.step)
        if self.dist.is_main:
            save_config(cfg, self.out / "config.yaml")

    # -- one step --------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, Any]:
        """Forward/backward/update at the α's the method samples for ``step``; returns the terms."""
        gen = torch.Generator().manual_seed(self.cfg.run.seed * _STEP_SEED + step)
        alphas = self.method.sampler(step, gen)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.total_steps, self.warmup_steps, self.cfg.optim.lr, self.cfg.optim.schedule)
        if self.method.phase_start is not None:  # the regime's phase (activation quantization), after the warm-up
            on = step >= self.method.phase_start
            if on != self._phase:
                self.record.phase(self.model, on)
                self._phase = on
        self.opt.zero_grad(set_to_none=True)
        ce_sum = torch.zeros((), device=self.device)
        correct = 0
        levels = []
        # Extra terms depend on the weights, not on α: they join the first α's backward, so every
        # step has exactly one backward per forward (what DistributedDataParallel expects).
        terms = {name: w * fn(self.sub) for name, (w, fn) in self.method.terms.items()}
        extra = sum(terms.values()) if terms else None
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, a in enumerate(alphas):
            levels.append(self.method.apply(self.sub, a, step))
            with self.bn_rows.updating(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.net(x)
                ce = F.cross_entropy(out, y, label_smoothing=self.cfg.optim.label_smoothing)
            (ce + extra if i == 0 and extra is not None else ce).backward()  # each α's graph freed at once
            ce_sum += ce.detach()
            correct += int((out.argmax(1) == y).sum())
        loss = ce_sum + sum(t.detach() for t in terms.values())
        if not bool(torch.isfinite(loss)):  # stop before the update: the weights and checkpoints stay good
            raise DivergedError(step, float(loss))
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model, step + 1)
        return {"loss": float(loss.detach()), "ce": float(ce_sum.detach()) / len(alphas),
                "acc": correct / (y.numel() * len(alphas)), "alphas": alphas, "levels": levels,
                **{k: float(v.detach()) for k, v in terms.items()}}

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, stop_after_epoch: int | None = None) -> list[dict[str, Any]]:
        """Train to ``optim.epochs`` (or stop after ``stop_after_epoch`` epochs, for time-boxed jobs);
        returns the per-epoch records also appended to ``metrics.jsonl``."""
        cfg = self.cfg
        records = []
        start_epoch, start_batch = divmod(self.step, self.steps_per_epoch)
        last_epoch = cfg.optim.epochs if stop_after_epoch is None else min(cfg.optim.epochs, stop_after_epoch)
        bar = None
        if cfg.run.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=True)
        self.model.train()
        for epoch in range(start_epoch, last_epoch):
            t0, seen, loss_sum, acc_sum, n = time.perf_counter(), 0, 0.0, 0.0, 0
            batches = train_batches(self.data, cfg.data.batch_size, epoch=epoch, seed=cfg.run.seed,
                                    start_batch=start_batch if epoch == start_epoch else 0,
                                    rank=self.dist.rank, world_size=self.dist.world_size,
                                    augment=cfg.data.augment, device=self.device)
            for x, y in batches:
                r = self.train_step(x, y, self.step)
                self.step += 1
                seen += y.numel() * len(r["alphas"]) * self.dist.world_size
                loss_sum, acc_sum, n = loss_sum + r["loss"], acc_sum + r["acc"], n + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{r['loss']:.3f}", acc=f"{r['acc']:.3f}",
                                    alpha=",".join(f"{a:.2f}" if not isinstance(a, dict) else
                                                   "/".join(f"{v:g}" for v in a.values()) for a in r["alphas"]))
            elapsed = time.perf_counter() - t0
            live = self._ship_ema()  # after the last step: the average becomes the model
            if not self.dist.is_main:
                continue  # rank 0 evaluates, logs and checkpoints; the others go on to the next epoch
            record = {"epoch": epoch + 1, "step": self.step, "lr": self.opt.param_groups[0]["lr"],
                      "train_loss": loss_sum / max(n, 1), "train_acc": acc_sum / max(n, 1),
                      "img_per_s": seen / max(elapsed, 1e-9), "epoch_seconds": elapsed}
            lo, hi = self.val_range
            with self._averaged():  # the average is validated: it is what will ship
                record.update(self._validate(lo, hi))
            record.update(live)
            records.append(record)
            say = bar.write if bar is not None else (lambda msg: print(msg, flush=True))
            lo_part = f"  α={lo:g}: {record['val_acc_lo']:.3f}" if lo != hi else ""
            say(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {record['train_loss']:.3f}  "
                f"val acc α={hi:g}: {record['val_acc_hi']:.3f}{lo_part}  "
                f"({record['img_per_s']:.0f} img/s, {elapsed:.0f} s)")
            if (epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == last_epoch:
                self._checkpoint(epoch + 1)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(dumps_json(record) + "\n")
        if bar is not None:
            bar.close()
        if records:
            self.bn_final_done = 0  # steps were taken since any earlier pass: its statistics are stale
        if (self.dist.is_main and self.step >= self.total_steps and cfg.method.bn_final_batches
                and self.bn_final_done != cfg.method.bn_final_batches):
            records.append(self.final_bn_pass())
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()  # nobody leaves (or tears the group down) while rank 0 still writes
        return records

    def final_bn_pass(self) -> dict[str, Any]:
        """Re-estimate the stored BatchNorm statistics with the final weights (``lcs.train.bn_pass``),
        checkpoint them and log the validation accuracy at both ends before and after."""
        cfg, n = self.cfg, self.cfg.method.bn_final_batches
        t0 = time.perf_counter()
        if self.method.phase_start is not None:  # the regime's phase as it was at the last step
            self.record.phase(self.model, self.total_steps - 1 >= self.method.phase_start)
        lo, hi = self.val_range
        before = {tag: v for tag, v in self._validate(lo, hi).items() if tag.startswith("val_acc")}
        batches = (x for x, _ in train_batches(self.data, cfg.data.batch_size, epoch=cfg.optim.epochs,
                                               seed=cfg.run.seed, augment=cfg.data.augment, device=self.device))
        counts = estimate_bn_stats(self.sub, self.method, batches, step=self.total_steps - 1, batches_per_row=n,
                                   seed=cfg.run.seed)
        self.model.train()
        record: dict[str, Any] = {"epoch": cfg.optim.epochs, "step": self.step, "bn_final_batches": n,
                                  "bn_rows_estimated": sum(c > 0 for c in counts)}
        record.update(self._validate(lo, hi))
        record.update({f"{k}_running_stats": v for k, v in before.items()})
        record["seconds"] = time.perf_counter() - t0
        self.bn_final_done = n
        save_checkpoint(self.out, self.model, self.opt, {"epoch": cfg.optim.epochs, "step": self.step,
                                                         "bn_final_batches": n, **self._run_state()},
                        keep=cfg.run.keep_checkpoints, tag="bn")
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(dumps_json(record) + "\n")
        change = {tag: f"{before[f'val_acc_{tag}']:.3f} -> {record[f'val_acc_{tag}']:.3f}" for tag in ("hi", "lo")}
        print(f"BatchNorm statistics re-estimated ({n} batches per row, {record['bn_rows_estimated']} rows, "
              f"{record['seconds']:.0f} s): val acc α={hi:g}: {change['hi']}"
              + (f"  α={lo:g}: {change['lo']}" if lo != hi else ""), flush=True)
        return record

    @property
    def val_range(self) -> tuple[float, float]:
        """The (efficient, accurate) α validated after each epoch: the method's point, or the range's ends."""
        return self.method.val_range or self.sub.alpha_range

    def _validate(self, lo: float, hi: float) -> dict[str, float]:
        """Validation accuracy and loss at the accurate (``hi``) and efficient (``lo``) α, evaluated
        once when they are the same point."""
        out: dict[str, float] = {}
        for tag, a in (("hi", hi), ("lo", lo)):
            if tag == "lo" and lo == hi:
                out["val_acc_lo"], out["val_loss_lo"] = out["val_acc_hi"], out["val_loss_hi"]
                continue
            with self.sub.at(a):
                out[f"val_acc_{tag}"], out[f"val_loss_{tag}"] = evaluate_accuracy(self.model, self.data, self.device)
        return out

    def _checkpoint(self, epoch: int) -> None:
        save_checkpoint(self.out, self.model, self.opt, {"epoch": epoch, "step": self.step, **self._run_state()},
                        keep=self.cfg.run.keep_checkpoints,
                        ema=self.ema.state_dict() if self.ema is not None and not self.ema_applied else None)

    def _run_state(self) -> dict[str, Any]:
        """What a checkpoint's state.json keeps beside the step: whether the average was shipped,
        and the statistics rows' batch counts."""
        return {**({"ema_applied": self.ema_applied} if self.ema is not None else {}), **self.bn_rows.state()}

    # -- the weight average (optim.ema) ----------------------------------------------------------
    def _averaged(self) -> AbstractContextManager[None]:
        """The weight average swapped in while it is still kept apart; otherwise the model as it is."""
        return self.ema.applied(self.model) if self.ema is not None and not self.ema_applied else nullcontext()

    def _ship_ema(self) -> dict[str, float]:
        """After the last step, copy the average into the model (on every rank); returns the live
        weights' validation accuracy, logged as ``val_acc_*_live`` beside the average's."""
        if self.ema is None or self.ema_applied or self.step < self.total_steps:
            return {}
        live = {}
        if self.dist.is_main:
            live = {f"{k}_live": v for k, v in self._validate(*self.val_range).items() if k.startswith("val_acc")}
        self.ema.copy_to(self.model)
        self.ema_applied = True
        return live

    def _restore_ema(self, state: dict[str, Any]) -> None:
        """Resume the average: from the checkpoint's, or from the loaded weights where none is kept (the
        run had no average, it was shipped and training goes on, or the statistics rows changed)."""
        tensors = state.pop("ema_tensors", None)
        if self.ema is None:
            return
        self.ema.reset(self.model)
        self.ema_applied = bool(state.get("ema_applied")) and self.step >= self.total_steps
        if tensors is not None and not state["bn_rows_reset"]:
            try:
                self.ema.load_state_dict(tensors)
            except ValueError as e:
                raise LcsError(f"{self.out}: {e}") from None

    def _truncate_log(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in kept))
