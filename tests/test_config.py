from pathlib import Path

import pytest

from lcs.errors import LcsError
from lcs.train.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    again = config_from_dict(config_to_dict(cfg)).validate()
    assert config_to_dict(again) == config_to_dict(cfg)


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["optim.lr=0.1", "optim.epochs=3", "data.augment=false", "method.target=none"])
    assert cfg.optim.lr == 0.1 and cfg.optim.epochs == 3 and cfg.data.augment is False and cfg.method.target is None


@pytest.mark.parametrize("pair, match", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("optimizer.lr=0.1", "unknown config key"),
    ("optim.epochs=abc", "not a valid int"),
    ("optim.epochs=1.5", "not a valid int"),
    ("lr", "key=value"),
])
def test_bad_overrides(pair, match):
    with pytest.raises(LcsError, match=match):
        apply_overrides(Config(), [pair])


@pytest.mark.parametrize("pairs, match", [
    (["method.d_min=0"], "d_min"),
    (["method.d_min=1.5"], "d_min"),
    (["method.name=nope"], "method.name"),
    (["method.name=target"], "target level"),
    (["method.name=target", "method.target=1.2"], "alpha"),
    (["data.val_fraction=1"], "val_fraction"),
    (["data.name=cifar10"], "needs a folder"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.schedule=step"], "optim.schedule must be one of cosine, linear"),
    (["model.norm=xx"], "model.norm"),
    (["run.amp=fp16"], "run.amp"),
    (["run.device=tpu"], "run.device"),
    (["data.pipeline=disk"], "data.pipeline"),
    (["data.pipeline=stream"], "image folders only"),
    (["data.workers=-1"], "data.workers"),
    (["data.split_seed=-1"], "data.split_seed"),
    (["data.crop_pad=-1"], "data.crop_pad"),
    (["data.flip=vertical"], "data.flip must be one of random, alternate"),
    (["data.crop_pad=16"], "data.crop_pad"),  # digits run at 16 px: a 16-pixel pad leaves no image in a crop
])
def test_validation_errors(pairs, match):
    with pytest.raises(LcsError, match=match):
        load_config(None, pairs)


def test_yaml_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.2\n  bogus: 1\n")
    with pytest.raises(LcsError, match="optim.bogus"):
        load_config(p)
    p.write_text("optim:\n  lr: 0.2\n")
    assert load_config(p).optim.lr == 0.2
    with pytest.raises(LcsError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_device_flags_and_pipeline_keys():
    cfg = load_config(None, ["run.device=auto", "run.amp=bf16", "run.channels_last=false", "data.name=folder",
                             "data.root=/data", "data.pipeline=stream", "data.workers=4"])
    assert (cfg.run.device, cfg.run.amp, cfg.run.channels_last) == ("auto", "bf16", False)
    assert (cfg.data.pipeline, cfg.data.workers) == ("stream", 4)
    defaults = load_config()
    assert (defaults.run.amp, defaults.run.channels_last, defaults.data.pipeline) == (None, None, "auto")
    assert load_config(None, ["run.amp=none"]).run.amp is None
    assert load_config(None, ["run.device=cuda:1"]).run.device == "cuda:1"  # checked against the machine later


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(path):
    """The recipes in configs/ are what the README tells users to run: an unknown or misspelled key
    there must fail here, not in the middle of someone's hour-long run."""
    cfg = load_config(str(path), ["data.root=/data/cifar10"])  # where the user's data is: not in the recipe
    assert cfg.regime_config() is not None


def test_split_seed_keeps_the_validation_split_when_run_seed_changes():
    """A subspace trained with another run.seed from a dense model must validate on that model's split."""
    import torch

    from lcs.train.run import open_data, split_seed

    base = open_data(load_config(None, ["run.seed=0"]))
    kept_cfg = load_config(None, ["run.seed=1", "data.split_seed=0"])
    kept, moved = open_data(kept_cfg), open_data(load_config(None, ["run.seed=1"]))
    assert split_seed(kept_cfg) == 0 and kept_cfg.run.seed == 1
    assert torch.equal(kept.val.images, base.val.images) and torch.equal(kept.val.labels, base.val.labels)
    assert not torch.equal(moved.val.images, base.val.images)


def test_crop_pad_sets_the_random_crop_of_training_batches():
    """crop_pad=0 on digits (no flips) must hand back the images unshifted; the default pad must not."""
    import torch

    from lcs.data import normalize, train_batches
    from lcs.train.run import open_data

    default = open_data(load_config())
    unshifted = open_data(load_config(None, ["data.crop_pad=0"]))
    assert (default.pad, unshifted.pad) == (2, 0)  # digits: image_size 16 // 8
    assert torch.equal(unshifted.train.images, default.train.images)  # same split, only the crop changes

    def first_batch(data):
        x, y = next(iter(train_batches(data, 64, epoch=0, seed=0)))
        return x, y

    x0, y0 = first_batch(unshifted)
    raw = normalize(unshifted.train.images, unshifted.mean, unshifted.std)
    matches = [(raw == xi).all(dim=(1, 2, 3)).nonzero().numel() > 0 for xi in x0]
    assert all(matches)  # every augmented image is one of the training images as it is
    x4, y4 = first_batch(default)
    assert torch.equal(y0, y4) and not torch.equal(x0, x4)
