"""torch_qode.models: the CIFAR ResNet family and MLPs with polynomial activations."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from torch_qode.models import BasicBlock, Polynomial, cifar_resnet, cifar_resnet_num_params, mlp


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ parameter counts
def test_paper_resnet32_widen4_has_exactly_7451044_parameters():
    model = cifar_resnet(32, 4, 100)
    assert n_params(model) == 7_451_044
    assert cifar_resnet_num_params(32, 4, 100) == 7_451_044


def test_hand_count_of_resnet32_widen4():
    """Independent tally, written out layer by layer (3×3 convs, BN weight+bias, projections)."""
    conv_bn = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # noqa: E731
    stem = conv_bn(3, 64, 3)
    stage1 = 5 * 2 * conv_bn(64, 64, 3)
    stage2 = conv_bn(64, 128, 3) + conv_bn(128, 128, 3) + conv_bn(64, 128, 1) + 4 * 2 * conv_bn(128, 128, 3)
    stage3 = conv_bn(128, 256, 3) + conv_bn(256, 256, 3) + conv_bn(128, 256, 1) + 4 * 2 * conv_bn(256, 256, 3)
    fc = 256 * 100 + 100
    assert stem + stage1 + stage2 + stage3 + fc == 7_451_044


def test_103M_model_depth56_widen11_on_meta_device():
    with torch.device("meta"):
        big = cifar_resnet(56, 11, 100)
    assert all(p.is_meta for p in big.parameters())
    assert n_params(big) == 103_024_340
    assert cifar_resnet_num_params(56, 11, 100) == 103_024_340
    with torch.device("meta"):
        out = big(torch.empty(2, 3, 32, 32))
    assert out.shape == (2, 100)


@pytest.mark.parametrize("depth,widen,classes,in_ch", [(8, 1, 10, 1), (14, 2, 10, 3), (20, 3, 7, 2), (26, 1, 1, 3)])
def test_analytic_count_matches_built_model(depth, widen, classes, in_ch):
    assert cifar_resnet_num_params(depth, widen, classes, in_ch) == n_params(
        cifar_resnet(depth, widen, classes, in_ch))


# ------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("depth,widen,classes,in_ch,size,batch", [
    (8, 1, 10, 1, (8, 8), 4),       # digits
    (14, 2, 10, 3, (32, 32), 2),    # CIFAR size
    (20, 1, 100, 3, (32, 32), 2),
    (8, 1, 5, 1, (1, 1), 2),        # smallest input
    (8, 2, 7, 3, (12, 20), 3),      # non-square
])
def test_forward_shapes(depth, widen, classes, in_ch, size, batch):
    torch.manual_seed(0)
    model = cifar_resnet(depth, widen, classes, in_channels=in_ch)
    out = model(torch.randn(batch, in_ch, *size))
    assert out.shape == (batch, classes)
    assert torch.isfinite(out).all()


def test_stage_resolutions_and_widths():
    model = cifar_resnet(8, 2, 10, in_channels=1)
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    model(torch.randn(2, 1, 8, 8))
    assert shapes == {"layer1": (2, 32, 8, 8), "layer2": (2, 64, 4, 4), "layer3": (2, 128, 2, 2)}


@pytest.mark.parametrize("depth,widen", [(14, 1), (20, 2)])
def test_projection_shortcuts_only_where_shape_changes(depth, widen):
    model = cifar_resnet(depth, widen, 10)
    n = (depth - 2) // 6
    blocks = [(s, i, b) for s in (1, 2, 3) for i, b in enumerate(getattr(model, f"layer{s}"))]
    assert len(blocks) == 3 * n and all(isinstance(b, BasicBlock) for _, _, b in blocks)
    for stage, i, block in blocks:
        changes = block.conv1.in_channels != block.conv2.out_channels or block.conv1.stride != (1, 1)
        assert changes == (stage > 1 and i == 0)
        if changes:
            conv, bn = block.shortcut
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        else:
            assert isinstance(block.shortcut, nn.Identity)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert len(convs) == 1 + 2 * 3 * n + 2  # stem, two per block, two projections
    assert model.fc.bias is not None
    # depth counts the weighted layers on the main path: stem + 2 per block + fc
    assert 1 + 2 * 3 * n + 1 == depth


def test_block_is_post_activation():
    torch.manual_seed(0)
    block = BasicBlock(4, 4)
    x = torch.randn(3, 4, 5, 5)
    out = block(x)
    assert (out >= 0).all()  # ReLU after the addition
    expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + x)
    torch.testing.assert_close(out, expected)


def test_kaiming_init():
    torch.manual_seed(0)
    model = cifar_resnet(14, 4, 10)
    w = model.layer3[1].conv1.weight  # 256 -> 256, 3×3
    fan_out = w.shape[0] * 9
    assert abs(w.std().item() / np.sqrt(2.0 / fan_out) - 1) < 0.02
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=30), "6n\\+2"), (dict(depth=7), "depth"), (dict(depth=2), "depth"),
    (dict(widen=0), "widen"), (dict(num_classes=0), "num_classes"), (dict(in_channels=0), "in_channels"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cifar_resnet(**kwargs)
    with pytest.raises(ValueError, match=match):
        cifar_resnet_num_params(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(depth=32.0), dict(widen="4"), dict(num_classes=True)])
def test_bad_argument_types(kwargs):
    with pytest.raises(TypeError):
        cifar_resnet(**kwargs)


def test_numpy_integers_are_accepted():
    model = cifar_resnet(np.int64(8), np.int32(1), np.int64(10), np.int64(1))
    assert n_params(model) == cifar_resnet_num_params(np.int64(8), np.int64(1), np.int16(10), np.int64(1)) == 77_754
    assert model.depth == 8 and type(model.depth) is int and type(model.widen) is int
    net = mlp(np.array([3, 4, 2]), ("poly", np.int64(2)))
    assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [4, 2] and net.degree == 2
    assert Polynomial.monomial(np.int64(3)).degree == 3
    with pytest.raises(TypeError):
        cifar_resnet(np.bool_(True))


def test_wrong_input_channels_named():
    model = cifar_resnet(8, 1, 10, in_channels=1)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 8, 8))


# ------------------------------------------------------------------------------------------- MLP
def test_polynomial_activation_values():
    z = torch.tensor([-2.0, -0.5, 0.0, 1.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(Polynomial.monomial(3)(z), z**3)
    coeffs = [0.5, -1.0, 0.0, 2.0, 0.0]  # trailing zero dropped: degree 3
    p = Polynomial(coeffs)
    assert p.degree == 3
    torch.testing.assert_close(p(z), torch.as_tensor(np.polynomial.polynomial.polyval(z.numpy(), coeffs)))


def test_mlp_structure_and_forward_by_hand():
    torch.manual_seed(0)
    model = mlp([3, 5, 4, 2], ("poly", 2))
    assert model.num_layers == 3 and model.degree == 2
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(3, 5), (5, 4), (4, 2)]
    assert isinstance(model[-1], nn.Linear)  # no activation on the output
    x = torch.randn(6, 3)
    h = (x @ linears[0].weight.T + linears[0].bias) ** 2
    h = (h @ linears[1].weight.T + linears[1].bias) ** 2
    torch.testing.assert_close(model(x), h @ linears[2].weight.T + linears[2].bias)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_poly_mlp_is_homogeneous_of_degree_s_in_first_weights(s):
    """Without biases, scaling W1 by c scales the output of a 2-layer z^s MLP by c^s."""
    torch.manual_seed(1)
    model = mlp([4, 6, 3], ("poly", s), bias=False).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = model(x)
    with torch.no_grad():
        model[0].weight.mul_(1.7)
    torch.testing.assert_close(model(x), 1.7**s * y)


@pytest.mark.parametrize("spec,kind,degree", [
    ("tanh", nn.Tanh, None), ("relu", nn.ReLU, None), (["poly", 4], Polynomial, 4),
    (("poly", [0.0, 1.0, 0.5]), Polynomial, 2), (Polynomial([1.0, 0.0, 3.0]), Polynomial, 2), (nn.GELU, nn.GELU, None),
])
def test_mlp_activation_specs(spec, kind, degree):
    model = mlp([2, 3, 3, 1], spec)
    acts = [m for m in model if not isinstance(m, nn.Linear)]
    assert len(acts) == 2 and all(isinstance(a, kind) for a in acts)
    assert model.degree == degree
    assert model(torch.randn(4, 2)).shape == (4, 1)


@pytest.mark.parametrize("widths,activation,exc", [
    ([3], "tanh", ValueError), ([3, 0, 2], "tanh", ValueError), ([3, 2.5, 2], "tanh", ValueError),
    (5, "tanh", TypeError), ([3, 2], "sigmoid", ValueError), ([3, 2], ("poly", 0), ValueError),
    ([3, 2], ("poly", 2.0), ValueError), ([3, 2], ("poly", [0.0, 0.0]), ValueError),
    ([3, 2], ("poly", ["a"]), TypeError), ([3, 2], ("poly", [1.0, float("nan")]), ValueError),
])
def test_mlp_bad_arguments(widths, activation, exc):
    with pytest.raises(exc):
        mlp(widths, activation)


@pytest.mark.parametrize("bias", ["no", 0, None, np.bool_(True)])
def test_mlp_bias_must_be_a_bool(bias):
    with pytest.raises(TypeError, match="bias must be a bool"):
        mlp([3, 2], "tanh", bias=bias)


@pytest.mark.parametrize("coeffs", ["12", b"12", [True, 1.0], ["1", 2.0], 3.0])
def test_polynomial_refuses_strings_and_bools(coeffs):
    with pytest.raises(TypeError, match="coefficients must be"):
        Polynomial(coeffs)
    assert Polynomial(c for c in (1.0, 2.0)).coefficients == (1.0, 2.0)   # any iterable of numbers


def test_models_import_without_torchvision_or_sklearn():
    code = ("import sys, torch_qode.models, torch_qode.data; "
            "bad = [m for m in ('torchvision', 'sklearn') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
