import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
