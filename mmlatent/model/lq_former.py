"""The LQ-Former: CoCoVa's latent thought generator.

A few learnable queries plus one query made from the LM's previous hidden state run through pre-norm
layers of self-attention (queries among themselves), cross-attention to the top-k visual tokens chosen by
`TokenSelector`, and an MLP. The hidden-state query's output is projected back to the LM width and mixed
with the hidden state by a learned gate, so a fresh LQ-Former starts close to sketch mode (gate ≈ 0.12)
and learns how much to look at the image. The learnable queries act as a small working memory that the
hidden-state query reads from; taking the hidden-state query's output (rather than pooling all queries)
keeps the thought tied to where the reasoning is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlatent.model.token_selection import TokenSelectionConfig, TokenSelector


@dataclass
class LQFormerConfig:
    """Shape of the LQ-Former."""

    num_queries: int = 4
    """Learnable queries (the hidden state adds one more)."""
    layers: int = 2
    """Pre-norm layers of self-attention, cross-attention and MLP."""
    heads: int = 4
    """Attention heads (must divide the LM width)."""
    mlp_ratio: float = 2.0
    """MLP width as a multiple of the LM width."""
    selection: TokenSelectionConfig = field(default_factory=TokenSelectionConfig)
    """Top-k visual token selection."""
    gate_init: float = -2.0
    """Initial bias of the mixing gate: sigmoid(-2) ≈ 0.12, so thoughts start close to the hidden state."""
    dropout: float = 0.0
    """Dropout inside attention and MLP."""


@dataclass
class Thought:
    """One batch of thoughts."""

    vector: Tensor
    """(n, D) LM inputs for the next slots."""
    indices: Tensor
    """(n, k) selected visual token indices (-1 invalid)."""
    relevance: Tensor
    """(n, M) relevance map over the visual tokens."""
    gate: Tensor
    """(n, 1) how much of the LQ-Former output the thought takes."""


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"latent.lq_former.heads={heads} must divide the LM width {dim}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        n, Q, D = x.shape
        H = self.heads
        q = self.q(x).view(n, Q, H, D // H).transpose(1, 2)  # (n, H, Q, d)
        k, v = self.kv(ctx).view(n, ctx.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 × (n, H, K, d)
        mask = None
        if ctx_mask is not None:
            has_ctx = ctx_mask.any(-1)  # (n,)
            # a row with nothing to attend to attends to everything, then contributes zero (never NaN)
            mask = (ctx_mask | ~has_ctx[:, None])[:, None, None, :]  # (n, 1, 1, K)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        if ctx_mask is not None:
            y = y * has_ctx[:, None, None, None]
        return self.out(y.transpose(1, 2).reshape(n, Q, D))  # (n, Q, D)


class _Layer(nn.Module):
    def __init__(self, dim: int, cfg: LQFormerConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, cfg.heads, cfg.dropout)
        self.cross_attn = _Attention(dim, cfg.heads, cfg.dropout)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, None)  # queries attend to each other
        x = x + self.cross_attn(self.norm2(x), ctx, ctx_mask)  # ... and to the selected visual tokens
        return x + self.mlp(self.norm3(x))


class LQFormer(nn.Module):
    """(h, visual tokens) -> the next latent thought."""

    def __init__(self, cfg: LQFormerConfig, hidden_size: int):
        super().__init__()
        D = hidden_size
        self.cfg = cfg
        self.selector = TokenSelector(cfg.selection, D)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, D) * 0.02)
        self.h_in = nn.Linear(D, D)
        self.ctx_norm = nn.LayerNorm(D)
        self.layers = nn.ModuleList(_Layer(D, cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        self.h_out = nn.Linear(D, D)
        self.gate = nn.Linear(2 * D, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, cfg.gate_init)

    def forward(self, h: Tensor, visual: Tensor, visual_mask: Tensor) -> Thought:
        """h (n, D) hidden states at p-1; visual (n, M, D); visual_mask (n, M) -> thoughts for slots p."""
        n, D = h.shape
        sel = self.selector(h, visual, visual_mask)
        x = torch.cat([self.queries[None].expand(n, -1, -1), self.h_in(h)[:, None]], dim=1)  # (n, Q+1, D)
        ctx = self.ctx_norm(sel.tokens)  # (n, k, D)
        for layer in self.layers:
            x = layer(x, ctx, sel.mask)
        out = self.h_out(self.norm(x[:, -1]))  # (n, D) the hidden-state query's output
        g = torch.sigmoid(self.gate(torch.cat([h, out], dim=-1)))  # (n, 1)
        return Thought(vector=g * out + (1 - g) * h, indices=sel.indices, relevance=sel.relevance, gate=g)
