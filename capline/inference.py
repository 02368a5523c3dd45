"""Captioning image files with a trained checkpoint: loading it, preprocessing as in training, batching, drawing.

module = load_caption_module("runs/demo/checkpoints/last.ckpt")
captioner = Captioner(module, device="cpu")
for result in captioner.caption_files(find_images(["photos/"]), batch_size=32):
    print(result.path, result.caption if result.error is None else result.error)
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from capline.checkpoints import CheckpointError, read_checkpoint
from capline.data.collate import ImageTransform
from capline.data.decode import IMAGE_EXTS, SkipSample, open_image
from capline.errors import first_line
from capline.module import CaptionModule

MIN_DISPLAY_SIDE = 320  # annotated images are upscaled to at least this short side, so the caption stays legible
MAX_DISPLAY_SIDE = 1024  # and downscaled to at most this long side
ATTENTION_PANEL_PX = 224  # side of each panel of the attention figure
CAPTION_CHARS_PER_LINE = 48  # the caption's font scales with the image width: about this many characters a line


# ---- loading --------------------------------------------------------------------------------------------------
def load_caption_module(ckpt_path: str | Path, run_config: str | Path | None = None) -> CaptionModule:
    """Loads a `capline fit` checkpoint on the CPU, in eval mode, with the vocabulary stored inside it.

    The checkpoint is read with `weights_only=True`, so nothing in it can run code. Its encoder and decoder config
    comes from its hyper-parameters or, for checkpoints that lack it, from the run's `config.yaml` (`run_config`,
    else the one LightningCLI wrote beside `checkpoints/`).

    Args:
        ckpt_path: A `.ckpt` file written by `capline fit`.
        run_config: The run's `config.yaml`, needed only when the checkpoint does not record its model parts.

    Raises:
        CheckpointError: The file is missing, unreadable, not a capline checkpoint, or does not fit its config.
    """
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    model_config = (checkpoint.get("config") or {}).get("model") or checkpoint.get("hyper_parameters") or {}
    parts = {name: model_config.get(name) for name in ("encoder", "decoder")}
    if not all(isinstance(part, dict) for part in parts.values()):
        parts = _model_parts_from_run_config(path, run_config)
    encoder = {**parts["encoder"], "init_args": dict(parts["encoder"].get("init_args") or {})}
    # The weights are in the checkpoint: nothing to download, and a local weights file need not exist here.
    encoder["init_args"].update(pretrained=False, checkpoint_path=None)
    try:
        module = CaptionModule.load_from_checkpoint(
            path, map_location="cpu", weights_only=True,
            vocabulary=checkpoint["vocab"], encoder=encoder, decoder=parts["decoder"],
        )  # fmt: skip
    except CheckpointError:
        raise
    except Exception as err:  # jsonargparse and state-dict errors mean the same to the user
        raise CheckpointError(f"{str(path)!r} could not be loaded as a capline model ({first_line(err)})") from None
    return module.eval()


def _model_parts_from_run_config(ckpt_path: Path, run_config: str | Path | None) -> dict:
    # LightningCLI writes config.yaml into the run folder, the parent of checkpoints/.
    run_dir_configs = [ckpt_path.parent.parent / "config.yaml", ckpt_path.parent / "config.yaml"]
    candidates = [Path(run_config)] if run_config else run_dir_configs
    for candidate in candidates:
        if candidate.is_file():
            model = (yaml.safe_load(candidate.read_text()) or {}).get("model") or {}
            if isinstance(model.get("encoder"), dict) and isinstance(model.get("decoder"), dict):
                return {"encoder": model["encoder"], "decoder": model["decoder"]}
    raise CheckpointError(
        f"{str(ckpt_path)!r} does not record its encoder and decoder config, and no run config.yaml with them is "
        f"at {' or '.join(map(str, candidates))}; pass the run's config.yaml with --run-config"
    )


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and each directory's `*.jpg`, `*.jpeg`, `*.png` files (not subdirectories), sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        else:
            found.append(path)  # a missing or unreadable file is reported when it is read
    return found


# ---- captioning -----------------------------------------------------------------------------------------------
@dataclass
class CaptionResult:
    """One image file's caption, or why it has none (`error`).

    `image` is the decoded RGB image (when asked for), `model_input` the uint8 (3, S, S) crop the model saw,
    `tokens` the generated words up to and including `<end>`, and `attention` (len(tokens), h, w) the attention
    weights over the feature grid for each of them (attention decoders only).
    """

    path: Path
    caption: str = ""
    error: str | None = None
    image: Image.Image | None = None
    model_input: torch.Tensor | None = None
    tokens: list[str] | None = None
    attention: np.ndarray | None = None


class Captioner:
    """Captions image files in batches with a `CaptionModule`, preprocessing them exactly as training did.

    Args:
        module: The trained model (see `load_caption_module`).
        device: Where the model runs.
        beam_size: Beam size; None uses the checkpoint's `test_beam_size`. 1 is greedy decoding.
    """

    def __init__(self, module: CaptionModule, device: str | torch.device = "cpu", beam_size: int | None = None):
        self.module = module.eval().to(device)
        self.device = torch.device(device)
        self.beam_size = beam_size or module.beam_sizes["test"]
        self.transform = ImageTransform(module.encoder.data_config)
        with torch.inference_mode():  # the feature grid the attention weights are laid out on
            probe = torch.zeros(1, 3, self.transform.size, self.transform.size, device=self.device)
            self.grid = tuple(module.encoder(probe).shape[-2:])  # (h, w)

    def read(self, path: Path, keep_image: bool = False) -> CaptionResult:
        """Decodes one file as training decodes a shard sample (a large JPEG at reduced scale); with `keep_image`,
        keeps the image at full resolution for drawing. Failures are returned, not raised."""
        try:
            raw = path.read_bytes()
            image = open_image(raw, draft_size=self.transform.resize_to)
            model_input = self.transform(image)
            if keep_image and image.size != Image.open(io.BytesIO(raw)).size:  # drafted: decode it again, whole
                image = open_image(raw)
        except SkipSample as skip:
            return CaptionResult(path, error=str(skip))
        except OSError as err:
            return CaptionResult(path, error=err.strerror or str(err))
        return CaptionResult(path, image=image if keep_image else None, model_input=model_input)

    @torch.inference_mode()
    def caption(self, results: list[CaptionResult]) -> None:
        """Fills in the captions (and attention) of decoded results, as one batch."""
        images = torch.stack([r.model_input for r in results]).to(self.device)  # (B, 3, S, S) uint8
        generation = self.module.generate(images, self.beam_size)
        vocab = self.module.vocab
        for i, result in enumerate(results):
            ids = generation.tokens[i].tolist()
            length = ids.index(vocab.end_id) + 1 if vocab.end_id in ids else len(ids)  # no <end>: max_len words
            result.caption = vocab.decode(ids)
            result.tokens = [vocab.words[t] for t in ids[:length]]
            if generation.alphas is not None:
                result.attention = generation.alphas[i, :length].float().cpu().view(length, *self.grid).numpy()

    def caption_files(
        self, paths: Iterable[Path], batch_size: int = 32, keep_images: bool = False
    ) -> Iterator[CaptionResult]:
        """Yields one result per path, in order; readable images are captioned `batch_size` at a time.
        With `keep_images`, each result holds its decoded image for drawing."""
        pending: list[CaptionResult] = []
        for path in paths:
            result = self.read(path, keep_images)
            pending.append(result)
            if sum(r.error is None for r in pending) == batch_size:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    def _flush(self, pending: list[CaptionResult]) -> list[CaptionResult]:
        readable = [r for r in pending if r.error is None]
        if readable:
            self.caption(readable)
        return pending


# ---- drawing --------------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def annotate(image: Image.Image, caption: str) -> Image.Image:
    """The image, scaled to a legible size, with its caption written on a white band under it."""
    scale = min(max(1.0, MIN_DISPLAY_SIDE / min(image.size)), MAX_DISPLAY_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shown = image.resize(size, Image.BICUBIC) if size != image.size else image
    font, margin = _font(max(16, round(2 * shown.width / CAPTION_CHARS_PER_LINE))), 8  # a letter is ~size/2 wide
    char_px = max(1.0, ImageDraw.Draw(shown).textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    lines = textwrap.wrap(caption or "(empty caption)", width=max(8, int((shown.width - 2 * margin) / char_px)))
    line_px = font.getbbox("Ag")[3] + 4
    canvas = Image.new("RGB", (shown.width, shown.height + len(lines) * line_px + 2 * margin), "white")
    canvas.paste(shown, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((margin, shown.height + margin + i * line_px), line, fill="black", font=font)
    return canvas


def attention_figure(model_input: torch.Tensor, tokens: list[str], attention: np.ndarray) -> Figure:
    """One panel per generated word: its attention weights, upsampled from the feature grid, over the model's
    input crop. Both are drawn at the panel's resolution (the crop enlarged pixel for pixel), so a 64 px input
    stays sharp under the heatmap. A bare `Figure` renders with Agg and touches no pyplot global state."""
    side = max(ATTENTION_PANEL_PX, model_input.shape[-1])
    crop = model_input.unsqueeze(0).float()  # (1, 3, S, S), the crop the grid refers to
    picture = F.interpolate(crop, size=(side, side), mode="nearest")[0].permute(1, 2, 0).byte().numpy()
    weights = torch.from_numpy(attention).float().unsqueeze(1)  # (L, 1, h, w)
    heatmaps = F.interpolate(weights, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()
    panels = [("image", None), *zip(tokens, heatmaps)]
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    inch = ATTENTION_PANEL_PX / 100
    figure = Figure(figsize=(cols * inch, rows * (inch + 0.3)), dpi=100)
    for index, (word, heatmap) in enumerate(panels):
        ax = figure.add_subplot(rows, cols, index + 1)
        ax.imshow(picture)
        if heatmap is not None:
            ax.imshow(heatmap, cmap="inferno", alpha=0.5, vmin=0.0, vmax=max(float(heatmap.max()), 1e-8))
        ax.set_title(word, fontsize=12)
        ax.axis("off")
    figure.tight_layout()
    return figure


def save_figures(figures: list[Figure], path: Path) -> None:
    """Renders figures one under the other (each centred) into one PNG at `path`, with an adaptive 256-colour
    palette that keeps a committed picture small (heatmaps are smooth, photos survive it)."""
    images = []
    for figure in figures:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        images.append(Image.open(buffer).convert("RGB"))
    width = max(image.width for image in images)
    canvas = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    top = 0
    for image in images:
        canvas.paste(image, ((width - image.width) // 2, top))
        top += image.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def save_outputs(result: CaptionResult, out_dir: Path, stem: str) -> list[Path]:
    """Writes `<stem>_caption.png` and, for attention decoders, `<stem>_attention.png`; returns their paths."""
    written = [out_dir / f"{stem}_caption.png"]
    annotate(result.image, result.caption).save(written[0])
    if result.attention is not None:
        written.append(out_dir / f"{stem}_attention.png")
        attention_figure(result.model_input, result.tokens, result.attention).savefig(written[1])
    return written
