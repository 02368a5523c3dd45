"""`pretrained: true` on a machine without network: one sentence when the weights are not cached, and a run that
works from the local Hugging Face cache (built here the way huggingface_hub lays it out) with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runner import CAPLINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REPO, COMMIT = "timm/resnet18.a1_in1k", "0123456789abcdef0123456789abcdef01234567"  # resnet18's default weights


def run(tmp_path: Path, data: dict, hf_home: Path, *extra: str) -> subprocess.CompletedProcess:
    home = tmp_path / "wandb-home"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home)}  # fmt: skip
    args = [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", data["train_shards"], "--data.val_shards", data["val_shards"],
        "--data.vocab", data["vocab"],
        "--data.global_batch_size", "8", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
        "--model.encoder.init_args.pretrained", "true",
        *extra,
    ]  # fmt: skip
    return subprocess.run([CAPLINE, "fit", *args], env=env, capture_output=True, text=True, timeout=600)


def test_pretrained_without_network_or_cache_fails_in_one_sentence(tmp_path, synthetic_data):
    result = run(tmp_path, synthetic_data, tmp_path / "empty-hf-home")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("capline: error:")]
    assert len(error) == 1, result.stderr[-3000:]
    for part in ("'resnet18'", REPO, str(tmp_path / "empty-hf-home"), "HF_HUB_OFFLINE=1", "checkpoint_path",
                 "timm.create_model('resnet18', pretrained=True)"):  # fmt: skip
        assert part in error[0], part
    assert not (tmp_path / "run/checkpoints").exists()  # nothing trained


@pytest.mark.slow
def test_pretrained_weights_load_offline_from_the_local_cache(tmp_path, synthetic_data):
    import timm
    from safetensors.torch import save_file

    # The demo's ResNet-18 widths (its model_kwargs, less the feature-stage choice timm applies after loading).
    kwargs = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["model"]["encoder"]["init_args"]["model_kwargs"]
    widths = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices")}
    weights = timm.create_model("resnet18", pretrained=False, **widths).state_dict()
    weights["conv1.weight"] = torch.full_like(weights["conv1.weight"], 0.0125)  # recognisable after loading
    snapshot = tmp_path / "hf-home/hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file(weights, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text(COMMIT)

    # the encoder stays frozen for the one step, so its weights are still the cached ones at the checkpoint
    result = run(tmp_path, synthetic_data, tmp_path / "hf-home", "--model.encoder_finetuning.freeze_steps", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.all(state["encoder.backbone.conv1.weight"] == 0.0125)
    assert torch.equal(
        state["encoder.backbone.layer2.1.bn2.running_var"], weights["layer2.1.bn2.running_var"]
    )  # the last stage kept
