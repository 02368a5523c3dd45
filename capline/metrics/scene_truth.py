"""Is a caption of a synthetic scene true? And does attention land on the object a word names?

CIDEr-D against five templated references rewards getting most words right; a reader asks whether the caption is
true. The generator knows every scene (`capline.data.synthetic`), so truth is exact here:

- `scene_accuracy`: the caption is one the generator could have written for the scene, in any of its five
  wordings, either object first: both objects' size, colour and shape and their relation are right. The
  relational wordings also count with the generator's own phrases interchanged ("to the left of" / "left of",
  "there is" before them or not, "is" between the objects or not): same meaning, and SCST writes such blends.
- `objects_correct`: both objects are named with the right colour and shape (every "<colour> <shape>" in the
  caption is one of the scene's two objects, and both are there).
- `relation_correct`: with sizes and colours set aside, the caption is one of the generator's wordings of the
  scene: the two shapes are the scene's and the relation between them is right.
- `attention_on_object`: for each colour or shape word of a true caption, the share of the attention mass
  (the weights the decoder used for that word, one per feature-map cell, each cell spread over its part of the
  image) inside the box of the object the word names; `attention_uniform` is what a uniform map would give (the
  box's share of the image). Mean per scene, then over scenes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from capline.data.synthetic import COLOURS, SHAPES, SIZES, decode_scene, scene_captions
from capline.vocab import tokenize

TRUTH_NAMES = ("scene_accuracy", "objects_correct", "relation_correct")
ATTENTION_NAMES = ("attention_on_object", "attention_uniform")
_MASKED = {**{w: "<size>" for w in SIZES}, **{w: "<colour>" for w in COLOURS}}


@lru_cache(maxsize=65536)
def true_captions(codes: tuple[int, ...]) -> frozenset[tuple[str, ...]]:
    """Every caption (as words) the generator writes for a scene given by `encode_scene` codes, in both orders."""
    first, second, relation = decode_scene(list(codes))
    inverse = {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
    captions = scene_captions(first, second, relation) + scene_captions(second, first, inverse)
    return frozenset(tuple(tokenize(c)) for c in captions + _rephrasings(first, second, relation, inverse))


def _rephrasings(first: dict, second: dict, relation: str, inverse: str) -> list[str]:
    """The generator's relational wordings with its own phrases interchanged: "to the left of" or "left of", with
    or without "there is" before the sentence (SCST writes such blends: they mean what the wordings mean)."""
    phrases = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
               "above": ("above",), "below": ("below",)}  # fmt: skip
    out = []
    for a, b, rel in ((first, second, relation), (second, first, inverse)):
        a_full, b_full = (f"{o['size']} {o['colour']} {o['shape']}" for o in (a, b))
        for phrase in phrases[rel]:
            out += [f"a {a_full} {phrase} a {b_full}", f"there is a {a_full} {phrase} a {b_full}"]
            out.append(f"a {a_full} is {phrase} a {b_full}")
    return out


@lru_cache(maxsize=65536)
def _masked_truth(codes: tuple[int, ...]) -> frozenset[tuple[str, ...]]:
    return frozenset(_mask(words) for words in true_captions(codes))


def _mask(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_MASKED.get(w, w) for w in words)


def named_objects(words: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """The `(colour, shape)` pairs a caption names: each colour word directly followed by a shape word."""
    return [(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]


def judge_caption(words: list[str] | tuple[str, ...], codes: list[int] | tuple[int, ...]) -> tuple[bool, bool, bool]:
    """`(exactly_true, objects_correct, relation_correct)` of a caption (its words) for a scene's codes."""
    words, codes = tuple(words), tuple(int(c) for c in codes)
    first, second, _ = decode_scene(list(codes))
    objects = {(first["colour"], first["shape"]), (second["colour"], second["shape"])}
    return (
        words in true_captions(codes),
        set(named_objects(words)) == objects,
        _mask(words) in _masked_truth(codes),
    )


def word_objects(words: list[str] | tuple[str, ...], codes: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """`(word position, object index)` for each colour or shape word of a caption naming the scene's objects.

    A shape word names the object of that shape (the two shapes of a scene differ); a colour word names the
    object whose shape follows it.
    """
    shapes = {SHAPES[int(codes[0])]: 0, SHAPES[int(codes[3])]: 1}
    pairs = []
    for t, word in enumerate(words):
        if word in shapes:
            pairs.append((t, shapes[word]))
        elif word in COLOURS and t + 1 < len(words) and words[t + 1] in shapes:
            pairs.append((t, shapes[words[t + 1]]))
    return pairs


def box_cell_shares(box: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h * w,) share of each feature-map cell's area that lies inside `box` ([x0, y0, x1, y1] image fractions)."""
    h, w = grid
    x0, y0, x1, y1 = (float(v) for v in box)
    xs, ys = np.arange(w + 1) / w, np.arange(h + 1) / h
    across = np.clip(np.minimum(x1, xs[1:]) - np.maximum(x0, xs[:-1]), 0, None) * w  # (w,)
    down = np.clip(np.minimum(y1, ys[1:]) - np.maximum(y0, ys[:-1]), 0, None) * h  # (h,)
    return (down[:, None] * across[None, :]).reshape(-1)


def attention_on_objects(
    words: list[str], codes: list[int], alphas: np.ndarray, boxes: np.ndarray, grid: tuple[int, int]
) -> tuple[float, float] | None:
    """Mean attention mass inside the named object's box over a caption's colour/shape words, and the mean a
    uniform map would put there; None when the caption names no object.

    Args:
        words: The caption's words; word t was produced with attention `alphas[t]`.
        codes: The scene's `encode_scene` codes.
        alphas: (L, h * w) attention weights per generated word (rows sum to 1).
        boxes: (2, 4) the objects' boxes as fractions of the model input.
        grid: (h, w) of the feature map.
    """
    pairs = word_objects(words, codes)
    if not pairs:
        return None
    shares = [box_cell_shares(box, grid) for box in boxes]  # (h * w,) per object
    mass = [float(alphas[t] @ shares[obj]) for t, obj in pairs]
    uniform = [float(shares[obj].mean()) for _, obj in pairs]
    return float(np.mean(mass)), float(np.mean(uniform))


class SceneTruth(Metric):
    """Truth of generated captions of synthetic scenes (see the module docstring), synced across DDP ranks.

    Per-image results are kept (1-D float64 states, so they concatenate across ranks even where a rank saw
    nothing) and an image id seen twice counts once, as in `CaptionMetrics`.

    Args:
        words: The vocabulary's words, to read generated token ids.
        end_id: Token that ends a caption.
        pad_id: Padding token; also ends a caption.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, words: list[str], end_id: int = 2, pad_id: int = 0, start_id: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.words, self.stop_ids, self.start_id = list(words), {end_id, pad_id}, start_id
        for name in ("image_ids", "exact", "objects", "relation", "attention", "uniform"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def decode(self, row: list[int]) -> list[str]:
        words = []
        for i in row:
            if i in self.stop_ids:
                break
            if i != self.start_id:
                words.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
        return words

    def update(
        self,
        preds: Tensor,
        scenes: Tensor,
        image_ids: Tensor,
        alphas: Tensor | None = None,
        boxes: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        """Adds a batch of generated captions.

        Args:
            preds: (B, L) generated token ids without `<start>`.
            scenes: (B, 7) `encode_scene` codes.
            image_ids: (B,) image ids.
            alphas: (B, L, h * w) attention weights per generated word (attention decoders), or None.
            boxes: (B, 2, 4) object boxes as fractions of the model input (needed with `alphas`).
            grid: (h, w) of the feature map (needed with `alphas`).
        """
        rows, codes = preds.tolist(), scenes.tolist()
        flags, attention = [], []
        alphas_np = alphas.float().cpu().numpy() if alphas is not None else None
        boxes_np = boxes.cpu().numpy() if boxes is not None else None
        for b, (row, scene) in enumerate(zip(rows, codes)):
            words = self.decode(row)
            flags.append(judge_caption(words, scene))
            measured = None
            if alphas_np is not None and flags[-1][0]:
                measured = attention_on_objects(words, scene, alphas_np[b], boxes_np[b], grid)
            attention.append(measured or (float("nan"), float("nan")))
        flags_t = torch.tensor(flags, dtype=torch.float64, device=self.device).view(-1, 3)
        attention_t = torch.tensor(attention, dtype=torch.float64, device=self.device).view(-1, 2)
        self.image_ids.append(image_ids.to(self.device, torch.float64))
        self.exact.append(flags_t[:, 0])
        self.objects.append(flags_t[:, 1])
        self.relation.append(flags_t[:, 2])
        self.attention.append(attention_t[:, 0])
        self.uniform.append(attention_t[:, 1])

    def compute(self) -> dict[str, Tensor]:
        """`scene_accuracy`, `objects_correct`, `relation_correct` (fractions of scenes), `num_scenes`, and for
        attention decoders `attention_on_object` and `attention_uniform` (means over the true captions)."""
        states = [self.image_ids, self.exact, self.objects, self.relation, self.attention, self.uniform]
        if isinstance(states[0], list) and not states[0]:
            return {"num_scenes": torch.tensor(0.0, device=self.device)}
        ids, exact, objects, relation, attention, uniform = (dim_zero_cat(s).cpu().numpy() for s in states)
        if ids.size == 0:  # synced, and no rank saw a scene
            return {"num_scenes": torch.tensor(0.0, device=self.device)}
        _, first = np.unique(ids, return_index=True)  # an image seen twice counts once
        results = {
            "scene_accuracy": exact[first].mean(),
            "objects_correct": objects[first].mean(),
            "relation_correct": relation[first].mean(),
            "num_scenes": float(first.size),
        }
        measured = first[~np.isnan(attention[first])]
        if measured.size:
            results["attention_on_object"] = attention[measured].mean()
            results["attention_uniform"] = uniform[measured].mean()
        return {name: torch.tensor(float(value), device=self.device) for name, value in results.items()}
