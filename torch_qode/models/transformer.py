"""A small character-level transformer language model (``recipes.train_char_lm``).

Token and learned position embeddings, ``nn.TransformerEncoderLayer`` blocks (pre-norm, GELU) under a
causal mask with the default scaled-dot-product attention, a final LayerNorm and a linear head.  QODE
expands its loss on the math attention kernel (:func:`~torch_qode.bridge.kernels.double_backward_kernels`);
every other step runs the default kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_real

__all__ = ["CharTransformer", "lm_loss"]


class CharTransformer(nn.Module):
    """``(B, L)`` token ids (``L ≤ context``) → ``(B, L, vocab)`` next-token logits."""

    def __init__(self, vocab: int, *, d_model: int = 64, heads: int = 4, layers: int = 2, ff: int = 128,
                 context: int = 64, dropout: float = 0.0):
        super().__init__()
        vocab, d_model, heads, layers, ff, context = (
            check_int(v, name, 1) for name, v in (("vocab", vocab), ("d_model", d_model), ("heads", heads),
                                                  ("layers", layers), ("ff", ff), ("context", context)))
        if d_model % heads:
            raise ValueError(f"d_model must be a multiple of heads, got d_model={d_model}, heads={heads}")
        dropout = check_real(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.vocab, self.context = vocab, context
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        L = idx.shape[-1]
        if L > self.context:
            raise ValueError(f"sequence length {L} exceeds the model's context {self.context}")
        x = self.embed(idx) + self.pos[:L]
        mask = self.mask[:L, :L]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``(B, L, V)`` logits against ``(B, L)`` targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
