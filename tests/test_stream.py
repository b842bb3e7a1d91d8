"""lcs.data.stream: ImageNet-style folders decoded per batch by DataLoader workers."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcs.data import ImageData, eval_batches, load_data, train_batches
from lcs.data.stream import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StreamData,
    decode_train,
    decode_val,
    random_resized_crop_box,
    resize_short_side,
    use_stream,
)
from lcs.data.stream import PIPELINES as STREAM_PIPELINES
from lcs.errors import LcsError
from lcs.train.config import AMP_MODES, PIPELINES

SIZE = 24


@pytest.fixture(scope="module")
def folder(image_folder) -> Path:
    return image_folder


def _load(root: Path, workers: int = 0) -> StreamData:
    data = load_data("folder", str(root), image_size=SIZE, pipeline="stream", workers=workers)
    assert isinstance(data, StreamData)
    return data


def _all(it) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(it)


def test_pipeline_rule_and_names():
    assert STREAM_PIPELINES == PIPELINES and AMP_MODES == ("bf16",)
    assert use_stream("auto", 64, 10) and use_stream("auto", 224, 1)
    assert not use_stream("auto", 32, 50_000)  # CIFAR-scale folders stay in memory
    assert use_stream("auto", 32, 2_000_000)  # 2 M × 3 × 32² bytes > 4 GiB
    assert use_stream("stream", 32, 1) and not use_stream("memory", 224, 10**7)
    with pytest.raises(LcsError, match="data.pipeline"):
        use_stream("disk", 32, 1)


def test_auto_picks_stream_for_large_images_and_memory_otherwise(folder):
    streamed = load_data("folder", str(folder), image_size=64, workers=0)
    assert isinstance(streamed, StreamData) and streamed.image_size == 64
    assert streamed.classes == ["cat", "dog", "eel"]
    assert len(streamed.train) == 16 and len(streamed.val) == 7  # broken/truncated files listed, .txt not
    assert streamed.mean == IMAGENET_MEAN and streamed.std == IMAGENET_STD
    with pytest.warns(UserWarning) as rec:  # the in-memory path warns about the same two files
        memory = load_data("folder", str(folder), image_size=SIZE, pipeline="auto")
    assert {"broken.jpg", "truncated.jpg"} <= {m for w in rec for m in ("broken.jpg", "truncated.jpg")
                                               if m in str(w.message)}
    assert isinstance(memory, ImageData)
    with pytest.raises(LcsError, match="folders only"):
        load_data("digits", pipeline="stream")
    with pytest.raises(LcsError, match="pipeline"):
        load_data("folder", str(folder), pipeline="disk")
    with pytest.raises(LcsError, match="workers"):
        load_data("folder", str(folder), pipeline="stream", workers=-1)


def test_crop_pad_and_flip_are_refused_for_streamed_folders(folder):
    from lcs.train.config import load_config
    from lcs.train.run import open_data

    cfg = load_config(None, ["data.name=folder", f"data.root={folder}", "data.image_size=64", "data.crop_pad=2",
                             "data.workers=0", "data.cache=false"])
    with pytest.raises(LcsError, match="data.crop_pad and data.flip apply to in-memory data"):
        open_data(cfg)
    with pytest.raises(LcsError, match="data.crop_pad and data.flip apply to in-memory data"):
        open_data(load_config(None, ["data.name=folder", f"data.root={folder}", "data.image_size=64",
                                     "data.flip=alternate", "data.workers=0", "data.cache=false"]))


def test_train_batches_shapes_and_determinism_per_seed_epoch(folder):
    data = _load(folder)
    a = _all(train_batches(data, 4, epoch=0, seed=0))
    assert len(a) == 4  # 16 files // 4, drop_last
    sizes = [len(y) for _, y in a]
    assert sum(sizes) == 15 and sorted(sizes) == [3, 4, 4, 4]  # broken.jpg dropped from its batch
    for x, y in a:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE) and y.dtype == torch.int64
        lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        per_channel = x.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
    again = _all(train_batches(data, 4, epoch=0, seed=0))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, again, strict=True))
    other_epoch = _all(train_batches(data, 4, epoch=1, seed=0))
    other_seed = _all(train_batches(data, 4, epoch=0, seed=1))
    assert not all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, other_epoch, strict=True))
    assert not all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, other_seed, strict=True))
    # resuming mid-epoch gives exactly the remaining batches
    tail = _all(train_batches(data, 4, epoch=0, seed=0, start_batch=2))
    assert len(tail) == 2 and all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a[2:], tail, strict=True))


def test_workers_do_not_change_the_batches(folder):
    seq, par = _load(folder, workers=0), _load(folder, workers=2)
    for kind in ("train", "val"):
        if kind == "train":
            one = _all(train_batches(seq, 4, epoch=3, seed=5))
            two = _all(train_batches(par, 4, epoch=3, seed=5))
        else:
            one, two = _all(eval_batches(seq, "val", 3)), _all(eval_batches(par, "val", 3))
        assert len(one) == len(two) > 0
        for (x, y), (x2, y2) in zip(one, two, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_ranks_take_slices_of_the_same_global_batch(folder):
    data = _load(folder)
    single = _all(train_batches(data, 4, epoch=2, seed=0))
    r0 = _all(train_batches(data, 4, epoch=2, seed=0, rank=0, world_size=2))
    r1 = _all(train_batches(data, 4, epoch=2, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) == len(single)  # every rank the same number of steps
    for (x, y), (x0, y0), (x1, y1) in zip(single, r0, r1, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_eval_in_order_with_the_truncated_file_left_out(folder):
    data = _load(folder)
    with pytest.warns(UserWarning) as rec:
        batches = list(eval_batches(data, "val", 4))
    messages = [str(w.message) for w in rec]
    assert sum("skipping unreadable image" in m and "truncated.jpg" in m for m in messages) == 1
    assert any("skipped 1 unreadable" in m for m in messages)
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]  # class order, the truncated eel image dropped


def test_each_unreadable_file_warns_once_and_each_pass_counts(folder):
    data = _load(folder)
    with pytest.warns(UserWarning) as first:
        list(train_batches(data, 4, epoch=0, seed=0))
    msgs = [str(w.message) for w in first]
    assert [m for m in msgs if "skipping" in m] == [m for m in msgs if "broken.jpg" in m and "skipping" in m]
    assert len([m for m in msgs if "skipping" in m]) == 1
    assert any("skipped 1 unreadable image file(s) of 16" in m for m in msgs)
    assert not any("notes.txt" in m for m in msgs)
    with pytest.warns(UserWarning) as second:
        list(train_batches(data, 4, epoch=1, seed=0))
    msgs = [str(w.message) for w in second]
    assert not any("skipping" in m for m in msgs) and any("skipped 1" in m for m in msgs)
    # a training batch with nothing readable cannot be skipped under DDP: a clear error, not a crash
    with pytest.raises(LcsError, match="every image of a training batch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(train_batches(data, 1, epoch=0, seed=0))


def test_val_transform_is_resize_then_center_crop(folder):
    """Against the plain two-step reference (resize the shorter side, then slice the centre)."""
    assert resize_short_side(500, 375, 256) == (341, 256)  # torchvision's Resize(256) on a 500×375 image
    assert resize_short_side(375, 500, 256) == (256, 341)
    for path in sorted((folder / "val").rglob("*.*")):
        if path.name == "truncated.jpg":
            continue
        got = decode_val(str(path), SIZE).astype(int)
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        nw, nh = resize_short_side(*rgb.size, round(SIZE * 256 / 224))
        full = np.asarray(rgb.resize((nw, nh), Image.Resampling.BILINEAR)).astype(int)
        top, left = int(round((nh - SIZE) / 2)), int(round((nw - SIZE) / 2))
        ref = full[top:top + SIZE, left:left + SIZE]
        assert got.shape == ref.shape == (SIZE, SIZE, 3)
        if path.suffix == ".png":
            assert np.abs(got - ref).max() <= 1, path
        else:  # JPEG: Image.draft may decode at a reduced DCT scale first; the geometry must not move
            assert np.abs(got - ref).mean() < 3, path


def test_random_resized_crop_box_follows_torchvision_rule():
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(200, 120, rng)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 120
        assert 0.08 * 0.9 <= w * h / (200 * 120) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # an extreme aspect ratio fails all ten tries: the whole height, clamped to ratio 4/3, centred
    assert random_resized_crop_box(1000, 10, random.Random(0)) == (493, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, random.Random(0)) == (0, 493, 10, 13)


def test_train_decode_is_crop_resize_and_flip(folder):
    path = str(folder / "train" / "dog" / "0.png")
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    flips = set()
    for seed in range(12):
        rng = random.Random(seed)
        left, top, w, h = random_resized_crop_box(*rgb.size, rng)
        flip = rng.random() < 0.5
        ref = np.asarray(rgb.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        if flip:
            ref = ref[:, ::-1]
        got = decode_train(path, SIZE, seed)
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
        plain = decode_train(path, SIZE, seed, hflip=False).astype(int)  # the same box, never mirrored
        assert np.abs(plain - (ref[:, ::-1] if flip else ref).astype(int)).max() <= 1
        flips.add(flip)
    assert flips == {True, False}
