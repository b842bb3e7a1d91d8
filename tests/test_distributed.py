"""Two CPU processes on gloo compute what one process computes with the same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lcs.data import ImageData, Split
from lcs.train.config import load_config

# d_min 0.3: at 2.5 % density most channels of the tiny first layers are all zero, and GroupNorm of a
# near-empty channel amplifies last-bit float differences (not a DDP effect) beyond any tolerance.
OVERRIDES = ["data.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=0.5", "run.progress=false",
             "run.threads=1", "method.d_min=0.3"]


def _data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (64,), generator=g))
    val = Split(split.images[:16].clone(), split.labels[:16].clone())
    return ImageData("synthetic", split, val, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3, 2, True)


def _worker(rank: int, world: int, port: int, out: str, method: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from lcs.train.distributed import shutdown_distributed
    from lcs.train.loop import Trainer

    trainer = Trainer(load_config(None, OVERRIDES + method), out, data=_data())
    trainer.fit()
    shutdown_distributed(trainer.dist)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", [["method.name=lcs_l"], ["method.name=lcs_p"],
                                    ["method.regime=structured", "method.name=lcs_l"]],
                         ids=["unstructured-lcs_l", "unstructured-lcs_p", "structured-lcs_l"])
def test_two_gloo_processes_equal_one(tmp_path, method):
    from lcs.train.loop import Trainer

    single = Trainer(load_config(None, OVERRIDES + method), tmp_path / "single", data=_data())
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.fit()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), method), nprocs=2, join=True,
                       start_method="spawn")
    from safetensors.torch import load_file

    from lcs.train.checkpoint import latest_checkpoint

    ddp = load_file(latest_checkpoint(tmp_path / "ddp") / "weights.safetensors")
    ref = single.model.state_dict()
    assert set(ddp) == set(ref)
    # Float reordering in the gradient all-reduce (and a TopK mask that may flip at an exact tie of
    # magnitudes because of it) leaves differences far below anything training would notice.
    worst = max(float((ddp[k] - v).abs().max()) for k, v in ref.items())
    assert worst < 1e-4, worst
    moved = max(float((v - initial[k]).abs().max()) for k, v in ref.items())
    assert moved > 100 * worst  # training moved the weights far more than the two runs differ
    assert (tmp_path / "ddp" / "metrics.jsonl").read_text().count("\n") == 1  # rank 0 logs once


def _stream_cfg(root: str):
    return load_config(None, OVERRIDES + ["method.name=lcs_p", "data.name=folder", f"data.root={root}",
                                          "data.pipeline=stream", "data.workers=0", "data.batch_size=8",
                                          "data.image_size=16"])


def _stream_worker(rank: int, world: int, port: int, out: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from lcs.train.distributed import shutdown_distributed
    from lcs.train.loop import Trainer

    trainer = Trainer(_stream_cfg(root), out)
    trainer.fit()
    shutdown_distributed(trainer.dist)


def test_two_gloo_processes_stream_their_shards_of_a_folder(tmp_path):
    """Streamed folders (DataLoader, RandomResizedCrop): each rank decodes only its rows of every
    global batch, and the result equals one process."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            folder = tmp_path / "img" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(20, 50)), int(rng.integers(20, 50)), 3)
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i}.jpg")
    from lcs.train.loop import Trainer

    single = Trainer(_stream_cfg(str(tmp_path / "img")), tmp_path / "single")
    single.fit()
    mp.start_processes(_stream_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path / "img")),
                       nprocs=2, join=True, start_method="spawn")
    from safetensors.torch import load_file

    from lcs.train.checkpoint import latest_checkpoint

    ddp = load_file(latest_checkpoint(tmp_path / "ddp") / "weights.safetensors")
    worst = max(float((ddp[k] - v).abs().max()) for k, v in single.model.state_dict().items())
    assert single.step == 2 and worst < 1e-4, worst
