import pytest
import torch
from torch import nn

import lcs
from lcs.ops import num_kept
from lcs.subspace import default_filter


def _model(norm="gn"):
    torch.manual_seed(0)
    return lcs.models.create("cpreresnet20", num_classes=10, norm=norm)


def test_default_filter_keeps_stem_and_classifier_dense():
    model = _model()
    sub = lcs.convert(model, lcs.UnstructuredConfig())
    assert "stem" not in sub.compressed and "classifier" not in sub.compressed
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(sub.compressed) == len(convs) - 2


def test_line_interpolates_endpoints():
    sub = lcs.convert(_model(), lcs.UnstructuredConfig(geometry="line"))
    conv = sub.model.get_submodule("stem")  # a line, never compressed
    w0 = conv.parametrizations.weight.original0
    w1 = conv.parametrizations.weight.original1
    for a in (0.025, 0.3, 0.77, 1.0):
        sub.set_alpha(a)
        assert torch.allclose(conv.weight, (1 - a) * w0 + a * w1, atol=1e-6)
    norm = sub.model.get_submodule("blocks.0.norm1")
    assert torch.all(norm.parametrizations.weight.original1 == 0.5)
    assert torch.all(norm.parametrizations.bias.original1 == 0)
    assert not torch.equal(w0, w1)  # independent endpoints


def test_line_then_topk_per_layer_exact_counts():
    sub = lcs.convert(_model(), lcs.UnstructuredConfig(geometry="line"))
    for a in (0.025, 0.1, 0.5, 1.0):
        sub.set_alpha(a)
        for fqn, w in sub.compressed_weights():
            assert int((w != 0).sum()) == num_kept(w.numel(), a), fqn
            # the compressed weight is TopK of the interpolated weight
            pl = sub.model.get_submodule(fqn).parametrizations.weight
            theta = torch.lerp(pl.original0, pl.original1, a)
            kept = w != 0
            assert torch.allclose(w[kept], theta[kept])


def test_point_geometry_has_no_lines():
    sub = lcs.convert(_model(), lcs.UnstructuredConfig(geometry="point"))
    assert sub.lines == []
    sub.set_alpha(0.1)
    x = torch.randn(2, 3, 32, 32)
    y01 = sub.model(x)
    sub.set_alpha(1.0)
    assert not torch.allclose(y01, sub.model(x))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), 0.01, "x"])
def test_alpha_outside_range_is_a_clear_error(bad):
    sub = lcs.convert(_model(), lcs.UnstructuredConfig(d_min=0.025))
    with pytest.raises(ValueError, match="alpha"):
        sub.set_alpha(bad)


def test_at_context_restores_alpha():
    sub = lcs.convert(_model(), lcs.UnstructuredConfig())
    sub.set_alpha(0.5)
    with sub.at(0.1) as level:
        assert level == 0.1 and sub.alpha == 0.1
    assert sub.alpha == 0.5


def test_materialize_equals_subspace_and_leaves_it_intact():
    sub = lcs.convert(_model(), lcs.UnstructuredConfig())
    sub.model.eval()
    x = torch.randn(3, 3, 32, 32)
    for a in (0.05, 0.5, 1.0):
        plain = lcs.materialize(sub, a)
        assert not any(hasattr(m, "parametrizations") for m in plain.modules())
        with sub.at(a):
            assert torch.allclose(plain(x), sub.model(x), atol=1e-6)
    sub.set_alpha(0.3)
    sub.model(x)  # the subspace still works after materializing copies


def test_convert_custom_model_and_filter():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 28 * 28, 4))
    sub = lcs.convert(model, lcs.UnstructuredConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert sub.compressed == ["5"]
    sub.set_alpha(0.1)
    assert int((model[5].weight != 0).sum()) == num_kept(model[5].weight.numel(), 0.1)


def test_convert_twice_is_an_error():
    model = _model()
    lcs.convert(model, lcs.UnstructuredConfig())
    with pytest.raises(lcs.LcsError, match="already converted"):
        lcs.convert(model, lcs.UnstructuredConfig())


def test_copy_init_starts_line_at_pretrained_weights():
    model = _model()
    w = model.stem.weight.detach().clone()
    sub = lcs.convert(model, lcs.UnstructuredConfig(line_init="copy"))
    for a in (0.1, 0.9):
        sub.set_alpha(a)
        assert torch.allclose(model.stem.weight, w)


def test_default_filter_on_single_layer_model():
    model = nn.Sequential(nn.Linear(4, 4))
    assert not default_filter(model)(model[0], "0")
