import pytest
import torch

from cifarcam.errors import UsageError
from cifarcam.models.resnet import build_model, find_layer


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_173_962), ("resnet34", 21_282_122)])
def test_standard_widths_match_the_reference_parameter_counts(name: str, params: int) -> None:
    model = build_model(name, 64)
    assert sum(p.numel() for p in model.parameters()) == params


def test_output_shape_and_layer_names_at_small_width() -> None:
    model = build_model("resnet18", 8, num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert [name for name, _ in model.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "linear",
    ]
    assert isinstance(find_layer(model, "layer4.1.conv2"), torch.nn.Conv2d)


def test_unknown_layer() -> None:
    with pytest.raises(
        UsageError, match="unknown layer 'layer5'; top-level layers are: conv1, bn1, relu, layer1"
    ):
        find_layer(build_model("resnet18", 8), "layer5")


def test_an_empty_layer_name_suggests_no_layer() -> None:
    with pytest.raises(UsageError) as raised:
        find_layer(build_model("resnet18", 8), "")
    assert raised.value.message.startswith("unknown layer ''; top-level layers are: conv1,")
    assert "did you mean" not in raised.value.message
