"""Training: the one config (``config``), methods as pluggable pieces (``methods``), the one loop
(``loop.Trainer``), checkpoints, distributed set-up, and building a run's pieces (``run``).
Never imported by the deploy side."""

__all__ = ["Trainer"]


def __getattr__(name: str):
    if name == "Trainer":  # lazily: ``lcs.train.config`` alone stays light
        from .loop import Trainer

        return Trainer
    raise AttributeError(f"module 'lcs.train' has no attribute {name!r}")
