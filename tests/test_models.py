"""ResNet18 / VGG19: parameter counts of the standard layouts, shapes per norm, LCS conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lcs
from lcs import models
from lcs.errors import LcsError
from lcs.models.vgg import CFG_E
from lcs.ops import num_kept


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _resnet18_formula(num_classes: int, stem_kernel: int) -> int:
    """Count from the layout: stem conv + norm, 4 stages × 2 BasicBlocks, downsample conv + norm
    where the shape changes, Linear 512 → classes. Every norm has a scale and a shift per channel."""
    total = _conv(3, 64, stem_kernel) + 2 * 64
    cin = 64
    for planes in (64, 128, 256, 512):
        for _ in range(2):
            total += _conv(cin, planes, 3) + 2 * planes + _conv(planes, planes, 3) + 2 * planes
            if cin != planes:  # first block of stages 2–4: stride 2 and more channels
                total += _conv(cin, planes, 1) + 2 * planes
            cin = planes
    return total + 512 * num_classes + num_classes


def _vgg19_formula(num_classes: int, imagenet: bool) -> int:
    total, cin = 0, 3
    for v in CFG_E:
        if v != "M":
            total += _conv(cin, v, 3, bias=True) + 2 * v
            cin = v
    if imagenet:
        return total + (512 * 49 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * num_classes + num_classes)
    return total + 512 * num_classes + num_classes


def test_parameter_counts_match_the_standard_layouts():
    r18 = models.create("resnet18", num_classes=1000, norm="bn")
    assert _params(r18) == _resnet18_formula(1000, 7) == 11_689_512  # torchvision resnet18
    assert _params(models.create("resnet18_cifar", num_classes=10, norm="bn")) == _resnet18_formula(10, 3)
    assert _params(models.create("vgg19_cifar", num_classes=10, norm="bn")) == _vgg19_formula(10, False)
    # GroupNorm and affine InstanceNorm learn the same scale + shift per channel as BatchNorm
    for norm in ("gn", "in"):
        assert _params(models.create("resnet18", num_classes=1000, norm=norm)) == 11_689_512
    assert sum(isinstance(m, nn.Conv2d) for m in r18.modules()) == 20  # 1 stem + 16 block + 3 downsample convs


@pytest.fixture(scope="module")
def vgg19_imagenet() -> nn.Module:
    """Built once: 143 M parameters take a few seconds to initialize."""
    torch.manual_seed(0)
    return models.create("vgg19", num_classes=1000, norm="bn")


def test_vgg19_imagenet_count_and_forward_backward(vgg19_imagenet):
    m = vgg19_imagenet
    assert _params(m) == _vgg19_formula(1000, True) == 143_678_248  # torchvision vgg19_bn
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 16
    x = torch.randn(2, 3, 64, 64)  # the 7×7 adaptive pool takes any input size
    out = m(x)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert m.features[0].weight.grad is not None and m.classifier[-1].weight.grad is not None


CASES = [("resnet18", 64, 10), ("resnet18_cifar", 32, 10), ("vgg19_cifar", 32, 10)]


@pytest.mark.parametrize("norm", ["gn", "in", "bn"])
@pytest.mark.parametrize("name, size, classes", CASES)
def test_forward_backward_shapes_per_norm(name, size, classes, norm):
    m = models.create(name, num_classes=classes, norm=norm, in_channels=3)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = m(x)
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None for p in m.parameters())
    norm_type = {"gn": nn.GroupNorm, "in": nn.InstanceNorm2d, "bn": nn.BatchNorm2d}[norm]
    assert any(isinstance(mod, norm_type) for mod in m.modules())


def test_in_channels_and_initial_logits():
    m = models.create("resnet18_cifar", num_classes=10, in_channels=1)
    assert m.conv1.weight.shape == (64, 1, 3, 3)
    with torch.no_grad():
        out = m(torch.randn(4, 1, 32, 32))
    # Linear N(0, 0.01): the first logits sit near zero, so the first loss is ~ln(10)
    assert out.abs().max() < 1.0
    assert models.create("vgg19_cifar", in_channels=1).features[0].weight.shape == (64, 1, 3, 3)


def test_residual_blocks_start_as_identity():
    m = models.create("resnet18_cifar", num_classes=10, norm="gn")
    blocks = [b for b in m.modules() if type(b).__name__ == "BasicBlock"]
    assert len(blocks) == 8 and all(not b.bn2.weight.detach().any() for b in blocks)
    assert all(bool((b.bn1.weight.detach() == 1).all()) for b in blocks)
    from lcs.models.resnet import ResNet

    plain = ResNet(num_classes=10, stem="cifar", zero_init_residual=False)
    assert all(bool((b.bn2.weight.detach() == 1).all()) for b in plain.modules() if type(b).__name__ == "BasicBlock")


def test_cpreresnet_zero_init_residual_starts_every_block_as_its_shortcut():
    torch.manual_seed(0)
    m = models.create("cpreresnet20", norm="bn", zero_init_residual=True).eval()
    assert all(not b.conv3.weight.detach().any() for b in m.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = m.stem(x)
        for b in m.blocks:  # the slow reference: each block is only its shortcut
            h = h if b.shortcut is None else b.shortcut(h)
        ref = m.classifier(m.pool(m.relu(m.norm(h)))).flatten(1)
        assert torch.allclose(m(x), ref, atol=1e-6)
    assert all(b.conv3.weight.detach().any() for b in models.create("cpreresnet20").blocks)


def test_zero_init_residual_config_builds_it_and_refuses_other_models():
    from lcs.train.config import load_config
    from lcs.train.run import build_subspace

    cfg = load_config(None, ["model.zero_init_residual=true", "method.name=target", "method.target=1.0"])
    cfg.model.num_classes = 10
    sub = build_subspace(cfg)
    convs = [mod for name, mod in sub.model.named_modules() if name.endswith("conv3")]
    assert convs and all(not c.weight.detach().any() for c in convs)
    with pytest.raises(LcsError, match="model.zero_init_residual"):
        load_config(None, ["model.zero_init_residual=true", "model.name=resnet18_cifar"])


def test_feature_map_sizes():
    """ImageNet stem: 224 → 56 into stage 1 → 7 into the pool; CIFAR stem keeps 32 → 4."""
    seen = {}
    m = models.create("resnet18", num_classes=10)
    m.layer1.register_forward_hook(lambda mod, i, o: seen.__setitem__("l1", o.shape[-1]))
    m.layer4.register_forward_hook(lambda mod, i, o: seen.__setitem__("l4", o.shape[-1]))
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert seen == {"l1": 56, "l4": 7}
    c = models.create("resnet18_cifar", num_classes=10)
    c.layer1.register_forward_hook(lambda mod, i, o: seen.__setitem__("c1", o.shape[-1]))
    c.layer4.register_forward_hook(lambda mod, i, o: seen.__setitem__("c4", o.shape[-1]))
    with torch.no_grad():
        c(torch.randn(1, 3, 32, 32))
    assert seen["c1"] == 32 and seen["c4"] == 4


def test_bad_norm_and_stem():
    with pytest.raises(LcsError, match="unknown norm"):
        models.create("resnet18", norm="xx")
    from lcs.models.resnet import ResNet
    from lcs.models.vgg import VGG

    with pytest.raises(LcsError, match="stem"):
        ResNet(stem="tiny")
    with pytest.raises(LcsError, match="head"):
        VGG(head="tiny")


@pytest.mark.parametrize("geometry", ["line", "point"])
@pytest.mark.parametrize("name, size, classes", CASES)
def test_convert_and_train_at_several_alphas(name, size, classes, geometry):
    torch.manual_seed(0)
    model = models.create(name, num_classes=classes, norm="gn")
    sub = lcs.convert(model, lcs.UnstructuredConfig(geometry=geometry, d_min=0.025))
    convs = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert convs[0] not in sub.compressed and convs[-1] not in sub.compressed  # stem and classifier dense
    assert len(sub.compressed) == len(convs) - 2
    if geometry == "line":
        assert any(fqn == convs[-1] for fqn, _ in sub.lines)  # the dense classifier is still a line
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    outs = {}
    for a in (0.025, 0.3, 1.0):
        density = sub.set_alpha(a)
        assert density == pytest.approx(a)
        opt.zero_grad()
        out = model(x)
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        torch.nn.functional.cross_entropy(out, y).backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        for _, w in sub.compressed_weights():
            kept = num_kept(w.numel(), a)  # TopK's exact count (a handful of kept values may be 0.0 themselves)
            assert kept - 8 <= int((w != 0).sum()) <= kept
        outs[a] = out.detach()
    assert not torch.allclose(outs[0.025], outs[1.0])  # α changes the network
