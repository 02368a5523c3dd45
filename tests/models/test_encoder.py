import pytest
import timm
import torch

from capline.models import EncoderConfigError, TimmEncoder, WeightsError


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    encoder = TimmEncoder("resnet18", pretrained=True, checkpoint_path=str(path))
    loaded = encoder.backbone.state_dict()
    for name, tensor in source.state_dict().items():
        if name.startswith("fc."):
            continue  # the classifier is dropped
        assert torch.equal(loaded[name], tensor), name
    fresh = TimmEncoder("resnet18", pretrained=False)
    assert not torch.equal(fresh.backbone.conv1.weight, source.conv1.weight)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth.*does not exist"):
        TimmEncoder("resnet18", pretrained=True, checkpoint_path=str(tmp_path / "nope.pth"))


def test_unknown_model_suggests_close_names():
    with pytest.raises(EncoderConfigError, match="unknown timm model 'resnet181'.*resnet18"):
        TimmEncoder("resnet181")


def test_trainable_stages_freezes_all_but_the_last_stages():
    encoder = TimmEncoder("resnet18", trainable_stages=1)
    trainable = {n.split(".")[0] for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    frozen_all = TimmEncoder("resnet18", trainable_stages=0)
    assert not any(p.requires_grad for p in frozen_all.parameters())


def test_data_config_follows_timm_with_overrides():
    encoder = TimmEncoder("resnet18", img_size=96, crop_pct=1.0)
    assert encoder.data_config["input_size"] == (3, 96, 96) and encoder.data_config["crop_pct"] == 1.0
    assert encoder.data_config["mean"] == timm.data.resolve_model_data_config(encoder.backbone)["mean"]


def test_timm_keyword_arguments_pass_through():
    finer = TimmEncoder("resnet18", img_size=64, model_kwargs={"output_stride": 16, "drop_path_rate": 0.1})
    features = finer(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert features.shape == (2, 512, 4, 4)  # stride 16 instead of 32
    assert finer.backbone.layer4[-1].drop_path.drop_prob == pytest.approx(0.1)  # timm ramps it up to the last block


def test_an_earlier_stage_gives_a_finer_cheaper_map():
    encoder = TimmEncoder("resnet18", model_kwargs={"features_only": True, "out_indices": [2]})
    assert encoder.num_features == 128
    assert encoder(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 128, 8, 8)
    assert not any(name.startswith("layer3") for name, _ in encoder.backbone.named_parameters())


def test_unknown_timm_keyword_fails_in_one_sentence():
    with pytest.raises(EncoderConfigError, match="does not take the keyword argument 'output_strid'") as info:
        TimmEncoder("resnet18", model_kwargs={"output_strid": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(EncoderConfigError, match="num_classes"):
        TimmEncoder("resnet18", model_kwargs={"num_classes": 10})
