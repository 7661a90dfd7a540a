"""The small model zoo: right output shapes for every data set, and only layers dpclip can clip."""

import pytest
import torch
from torch import nn

from dpclip.layers import default_registry
from dpclip.models import MODELS, CenterUnitRange, build_model, cnn, mlp

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
PARAMETER_FREE = (nn.Sequential, CenterUnitRange, nn.Flatten, nn.Tanh, nn.MaxPool2d)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_model_maps_a_batch_of_images_to_class_logits(name, shape):
    model = build_model(name, shape, 10)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_every_trainable_module_has_a_dpclip_rule(name, shape):
    registry = default_registry()
    for module in build_model(name, shape, 10).modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert registry.rule_for(module) is not None, type(module).__name__
        else:
            assert isinstance(module, PARAMETER_FREE), type(module).__name__
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)


def test_mlp_infers_its_input_size_and_matches_64_128_10_on_digits():
    linears = [m for m in mlp((1, 8, 8), 10) if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 10)]
    assert mlp((3, 32, 32), 4)[2].in_features == 3072


@pytest.mark.parametrize(("shape", "blocks"), [((1, 8, 8), 1), ((1, 28, 28), 2), ((3, 32, 32), 3)])
def test_cnn_uses_one_conv_block_per_halving_down_to_side_4_to_7(shape, blocks):
    model = cnn(shape, 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == blocks
    assert sum(isinstance(m, nn.Conv2d) for m in model) == 2 * blocks
    assert model[1].in_channels == shape[0]


def test_bad_model_requests_raise_value_error():
    with pytest.raises(ValueError, match="unknown model 'resnet'; expected one of mlp, cnn"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="at least 8×8"):
        cnn((1, 4, 4), 10)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        cnn((64,), 10)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        mlp((1, 8, 8), 1)
    with pytest.raises(ValueError, match="positive sizes"):
        mlp((1, 0, 8), 10)


@pytest.mark.parametrize("name", MODELS)
def test_models_see_inputs_centred_from_unit_range_to_minus_one_one(name):
    model = build_model(name, (1, 8, 8), 10)
    assert isinstance(model[0], CenterUnitRange)
    x = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(model[0](x), torch.tensor([-1.0, -0.5, 1.0]))
