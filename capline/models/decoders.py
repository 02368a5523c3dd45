"""LSTM caption decoders: Show and Tell, and Show, Attend and Tell.

Both expose the same small interface, so sampling, scheduled sampling, greedy and beam search are written once:
`init_state(features)` returns a dict of batch-first tensors, `step(tokens, state)` advances one word, and
`forward(features, tokens)` scores a whole teacher-forced sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

State = dict[str, torch.Tensor]


class CaptionDecoder(nn.Module):
    """Shared decoding logic; subclasses implement `init_state`, `step` and may override `forward`."""

    vocab_size: int
    # State entries that depend on the image only and never change while decoding. They may be held once per
    # image while the other entries hold k rows per image (k beams, image-major): `step` broadcasts them.
    image_state: tuple[str, ...] = ()

    def init_state(self, features: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Feeds tokens (B,) and returns logits (B, V) for the next word and the new state."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, T) starting with `<start>` -> logits (B, T, V) for the next words."""
        state = self.init_state(features)
        logits = []
        for t in range(tokens.shape[1]):
            step_logits, state = self.step(tokens[:, t], state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    def forward_scheduled(
        self, features: torch.Tensor, tokens: torch.Tensor, ss_prob: float, sample: bool = True
    ) -> torch.Tensor:
        """Scheduled sampling (Bengio et al. 2015): each input token after `<start>` is, with probability
        `ss_prob`, replaced by the model's own previous prediction (sampled from its distribution, or argmax).

        Returns logits (B, T, V), like `forward`.
        """
        if ss_prob <= 0.0:
            return self(features, tokens)
        state = self.init_state(features)
        logits, inputs = [], tokens[:, 0]
        for t in range(tokens.shape[1]):
            step_logits, state = self.step(inputs, state)
            logits.append(step_logits)
            if t + 1 < tokens.shape[1]:
                inputs = self._mix_inputs(tokens[:, t + 1], step_logits.detach(), ss_prob, sample)
        return torch.stack(logits, dim=1)

    @staticmethod
    def _mix_inputs(truth: torch.Tensor, logits: torch.Tensor, ss_prob: float, sample: bool) -> torch.Tensor:
        use_model = torch.rand(truth.shape, device=truth.device) < ss_prob  # (B,)
        if sample:
            own = torch.multinomial(F.softmax(logits.float(), dim=-1), 1).squeeze(1)
        else:
            own = logits.argmax(dim=-1)
        return torch.where(use_model, own, truth)

    @staticmethod
    def reorder_state(state: State, index: torch.Tensor) -> State:
        """Selects batch rows of every state tensor (beam search reorders hypotheses with this)."""
        return {k: v.index_select(0, index) for k, v in state.items()}


class ShowTellDecoder(CaptionDecoder):
    """Show and Tell (Vinyals et al. 2015): the projected image is the LSTM's first input, then the words.

    Args:
        vocab_size: Number of words, special tokens included (filled in from the vocabulary).
        feature_dim: Channels of the encoder's feature map (filled in from the encoder).
        embed_dim: Word and image embedding size.
        hidden_dim: LSTM hidden size.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on embeddings, between LSTM layers and before the output layer.
        image_norm: Batch-normalise the projected image (as the widely used pytorch-tutorial captioner does):
            pooled ReLU features share a large common component that otherwise drowns what tells images apart.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.3,
        image_norm: bool = True,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.image_proj = nn.Linear(feature_dim, embed_dim)
        self.image_norm = nn.BatchNorm1d(embed_dim) if image_norm else nn.Identity()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def _image_input(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return self.dropout(self.image_norm(self.image_proj(pooled))).unsqueeze(1)  # (B, 1, E)

    def _lstm(self, inputs: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None = None):
        # oneDNN has no bf16 LSTM primitive for every shape on every CPU ("could not create a primitive
        # descriptor"): under CPU autocast the recurrence runs in float32, the rest of the model in bf16.
        if inputs.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.lstm(inputs.float(), None if hc is None else tuple(t.float() for t in hc))
        return self.lstm(inputs, hc)

    def init_state(self, features: torch.Tensor) -> State:
        _, (h, c) = self._lstm(self._image_input(features))
        return {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}  # (B, L, H): batch-first so beams can reorder

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        hc = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        out, (h, c) = self._lstm(self.dropout(self.embed(tokens)).unsqueeze(1), hc)  # out (B, 1, H)
        return self.head(self.dropout(out.squeeze(1))), {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # One fused cuDNN/MKL LSTM call over [image, words]: teacher forcing stays fast.
        inputs = torch.cat([self._image_input(features), self.dropout(self.embed(tokens))], dim=1)  # (B, 1+T, E)
        out, _ = self._lstm(inputs)
        return self.head(self.dropout(out[:, 1:]))  # (B, T, V)


_ATTENTION_BLOCK = 1 << 20  # elements of the attention intermediate computed at once without autograd (4 MiB)


class AttentionDecoder(CaptionDecoder):
    """Show, Attend and Tell (Xu et al. 2015): additive attention over the feature map at every word.

    The attention weights of the last step are kept in the state as `alpha` (B, h*w), so inference can draw them.

    Args:
        vocab_size: Number of words, special tokens included (filled in from the vocabulary).
        feature_dim: Channels of the encoder's feature map (filled in from the encoder).
        embed_dim: Word embedding size.
        hidden_dim: LSTM hidden size.
        attention_dim: Size of the additive attention's hidden layer.
        dropout: Dropout before the output layer and on embeddings.
        positions: Append each feature-map cell's (x, y) centre, in [-1, 1], to its features (as CoordConv
            does), so the attended context says where the model looks: what "left of" and "above" need.
            A CNN's features carry position only weakly (through its padding).
        init_layout: 0 starts the LSTM from the mean of the feature map (Xu et al.); k > 0 from a learned
            projection of the map average-pooled to k x k cells (like the fully connected layers of the VGG
            net of the paper, which see the whole map): the initial state then knows where things are.
        query: Which state chooses where to look for word t. "previous" (Xu et al.): h_{t-1}, before the LSTM
            has read word t-1, and the context goes into the LSTM. "current" (the spatial attention of Lu et al.
            2017, "Knowing When to Look"): h_t, after the LSTM has read word t-1, and the context goes straight
            to the output layer (the LSTM gets the previous context, as Luong et al.'s input feeding). With
            "current", the word just said ("blue") already steers where the next word ("circle") looks.
    """

    image_state = ("feats", "feats_proj")

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.3,
        positions: bool = False,
        init_layout: int = 0,
        query: str = "previous",
    ):
        super().__init__()
        if init_layout < 0:
            raise ValueError(f"init_layout must be 0 (mean features) or a grid side >= 1, got {init_layout}")
        if query not in ("previous", "current"):
            raise ValueError(f"query must be 'previous' (Xu et al.) or 'current' (Lu et al.), got {query!r}")
        self.vocab_size = vocab_size
        self.positions = positions
        self.query = query
        feature_dim += 2 if positions else 0
        self.layout = nn.AdaptiveAvgPool2d(init_layout) if init_layout else None
        init_dim = feature_dim * init_layout**2 if init_layout else feature_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim)  # the paper's beta gate on the context
        self.init_h = nn.Linear(init_dim, hidden_dim)
        self.init_c = nn.Linear(init_dim, hidden_dim)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        # "current": the output layer reads h_t + W context_t (Lu et al.'s W_p(c_t + h_t)).
        self.context_out = nn.Linear(feature_dim, hidden_dim) if query == "current" else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> State:
        if self.positions:
            features = torch.cat([features, _cell_centres(features)], dim=1)  # (B, C + 2, h, w)
        feats = features.flatten(2).transpose(1, 2)  # (B, N, C) with N = h*w
        summary = feats.mean(dim=1) if self.layout is None else self.layout(features).flatten(1)  # (B, C * k * k)
        return {
            "feats": feats,
            "feats_proj": self.feature_proj(feats),  # (B, N, A): computed once, reused at every word
            "h": torch.tanh(self.init_h(summary)),
            "c": torch.tanh(self.init_c(summary)),
            "alpha": feats.new_zeros(feats.shape[:2]),
            "context": feats.mean(dim=1),  # (B, C): the previous context ("current" query), the mean at first
        }

    def _attend(self, h: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated context (I*k, C) and attention weights (I*k, N) for queries h (I*k, H), k rows per image."""
        feats = state["feats"]  # (I, N, C)
        images, locations, channels = feats.shape
        energy = self._energy(state["feats_proj"], self.hidden_proj(h))
        alpha = F.softmax(energy.float(), dim=1).to(feats.dtype)  # (I*k, N)
        attended = torch.bmm(alpha.view(images, -1, locations), feats).view(-1, channels)  # (I*k, C)
        return torch.sigmoid(self.gate(h)) * attended, alpha

    def _advance(self, embedded: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One step from an embedded word (B, E): attend, update h and c. Returns the output layer's input."""
        h, c = state["h"], state["c"]  # (I*k, H) for k rows per image
        if self.query == "previous":
            context, alpha = self._attend(h, state)
            h, c = self.cell(torch.cat([embedded, context], dim=1), (h, c))
            return h, {**state, "h": h, "c": c, "alpha": alpha}
        h, c = self.cell(torch.cat([embedded, state["context"]], dim=1), (h, c))
        context, alpha = self._attend(h, state)
        return h + self.context_out(context), {**state, "h": h, "c": c, "alpha": alpha, "context": context}

    def _energy(self, feats_proj: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Additive attention scores (I*k, N) = w . tanh(feats_proj + query) for feats_proj (I, N, A) and
        queries (I*k, A), k rows per image.

        The (I, k, N, A) intermediate of a large search batch (500 images x 3 beams x 49 locations x 512 = 150 MB)
        would go through memory three times per word; without autograd it is computed in blocks of images that
        stay in cache.
        """
        images, locations, width = feats_proj.shape
        k = query.shape[0] // images
        query = query.view(images, k, 1, width)
        block = max(1, _ATTENTION_BLOCK // (k * locations * width))
        if torch.is_grad_enabled() or images <= block:
            return self.score(torch.tanh(feats_proj.unsqueeze(1) + query)).view(images * k, locations)
        dtype = torch.promote_types(feats_proj.dtype, query.dtype)  # bf16 under autocast, whose rules skip out=
        energy = query.new_empty(images * k * locations, 1, dtype=dtype)
        hidden = query.new_empty(block, k, locations, width, dtype=dtype)
        weight, bias = self.score.weight.to(dtype).view(width, 1), self.score.bias.to(dtype)
        rows = k * locations
        for start in range(0, images, block):
            end = min(start + block, images)
            part = torch.add(feats_proj[start:end].unsqueeze(1), query[start:end], out=hidden[: end - start])
            torch.addmm(bias, part.tanh_().view(-1, width), weight, out=energy[start * rows : end * rows])
        return energy.view(images * k, locations)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self._advance(self.dropout(self.embed(tokens)), state)
        return self.head(self.dropout(out)), state

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # Teacher forcing: embed all words and apply the output layer once; only the recurrence steps.
        state = self.init_state(features)
        embedded = self.dropout(self.embed(tokens))  # (B, T, E)
        outputs = []
        for t in range(tokens.shape[1]):
            out, state = self._advance(embedded[:, t], state)
            outputs.append(out)
        return self.head(self.dropout(torch.stack(outputs, dim=1)))  # (B, T, V)


def _cell_centres(features: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): the x and y of each cell's centre, from -1 (left, top) to 1 (right, bottom)."""
    batch, _, h, w = features.shape
    ys = (torch.arange(h, device=features.device, dtype=features.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=features.device, dtype=features.dtype) + 0.5) / w * 2 - 1
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])  # (2, h, w)
    return grid.unsqueeze(0).expand(batch, 2, h, w)
