from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcs.data import ImageData, Split, load_data


@pytest.fixture(scope="session")
def digits() -> ImageData:
    return load_data("digits", val_fraction=0.1, seed=0, image_size=16)


@pytest.fixture(scope="session")
def tiny_digits(digits) -> ImageData:
    """A 192-image training subset: enough for a few real steps in well under a second each."""
    def cut(s: Split, n: int) -> Split:
        return Split(s.images[:n].clone(), s.labels[:n].clone())

    return ImageData(digits.name, cut(digits.train, 192), cut(digits.val, 64), digits.classes, digits.mean,
                     digits.std, digits.pad, digits.hflip)


def _train_digits_run(out, regime: str, method: str, *extra: str):
    from lcs.cli import main

    argv = ["train", "--regime", regime, "--method", method, "--data", "digits", "--out", str(out), "--epochs", "1",
            "--no-progress", "--set", "data.batch_size=128", "--set", "optim.warmup_epochs=0.2", *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def train_digits_run():
    """``train_digits_run(out, regime, method, *flags)``: one fast CLI training epoch on digits."""
    return _train_digits_run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _smooth(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colour gradient plus a seeded offset: JPEG keeps it well, and images differ."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 100 / (w + h)], -1)
    return (base + seed * 7 % 55).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An ImageNet-style folder: train/ (5 per class) and val/ (2 per class) with 3 classes, JPEGs and
    PNGs of varied sizes, one corrupted file in train, one truncated JPEG in val and a .txt file."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    k = 0
    for split, n in (("train", 5), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(30, 90)), int(rng.integers(30, 90))
                Image.fromarray(_smooth(w, h, k)).save(d / f"{i}.{'png' if i == 0 else 'jpg'}")
                k += 1
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "train" / "dog" / "notes.txt").write_text("not an image, and not even listed")
    good = (root / "val" / "eel" / "1.jpg").read_bytes()
    (root / "val" / "eel" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root
