"""The LQ-Former: CoCoVa's latent thought generator.

A few learnable queries plus one query made from the LM's previous hidden state h run through pre-norm
layers of self-attention (all queries among themselves), cross-attention to the visual context, and an
MLP. The h-query's output is projected back to the LM width and mixed with h by a learned gate
g = sigmoid(W [h; out] + b): a fresh LQ-Former (b = `gate_init`, W = 0) starts close to sketch mode and
learns how much of the image to let in. The learnable queries are a small working memory the h-query
reads from; taking the h-query's output (rather than pooling all queries) keeps the thought tied to where
the reasoning is, and makes the module a function of h that the gate can compare with h. With
`base: selected` the thought is instead the most relevant visual token itself plus g * out, so the LM is
handed the image patch the thought chose, in the form it reads in the image, and the gate cannot shut it out.

The visual context is the top-k tokens from `TokenSelector` plus one summary token, the
relevance-weighted mean of all visible tokens. The trade-off: top-k alone gives a sharp, interpretable
selection, but its relevance head learns only through the k tokens it already picks (straight-through),
and on a content-addressed lookup it stays at chance (measured: 16 tokens, top-2, 1,500 steps, hit rate
0.15 against 0.125 for chance). The summary token carries the gradient of every token's relevance, so
the selection learns to find the right token, and once it does, the top-k hand the raw token to
cross-attention (the same lookup with it: hit rate > 0.97 after 200 steps). It costs one extra key per
thought, and cross-attention sees a blurred view of the whole image while the relevance is still flat.

Batched over any n: the latent loop calls it with n = B (one slot per sample) or n = B·S (Jacobi mode,
all slots at once). A row with no visible token gets a zero cross-attention update, never NaN. Handed a
`RowDropout` (MC-dropout test-time scaling), every dropout site draws each row's mask from that row's
generator, in eval mode too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlatent.model.mc_dropout import RowDropout
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
    """Initial bias of the mixing gate: sigmoid(-2) ≈ 0.12, so thoughts start close to the base."""
    base: Literal["hidden", "selected"] = "hidden"
    """What a thought is built on. `hidden`: the LM's hidden state h, mixed with the LQ-Former output by
    the gate (CoCoVa: g * out + (1 - g) * h). `selected`: the most relevant visual token itself, which is
    in the LM's input space, plus g * out: the LM gets the selected token as it reads it in the image, and
    the gate cannot shut the image out (measured with `hidden`: the gate closes to 0.27 and the thought
    loses the colour a linear probe reads at 73% from the output)."""
    dropout: float = 0.0
    """Dropout in attention and MLP, active in train mode only. (MC-dropout test-time scaling,
    `generation.latent_noise: mc_dropout`, drops at the same sites at its own rate, in eval mode.)"""

    def __post_init__(self) -> None:
        if self.num_queries < 0:
            raise ValueError(f"latent.lq_former.num_queries={self.num_queries} must be >= 0")
        if self.layers < 1:
            raise ValueError(f"latent.lq_former.layers={self.layers} must be at least 1")
        if self.heads < 1:
            raise ValueError(f"latent.lq_former.heads={self.heads} must be at least 1")
        if self.mlp_ratio <= 0:
            raise ValueError(f"latent.lq_former.mlp_ratio={self.mlp_ratio} must be > 0")
        if self.base not in ("hidden", "selected"):
            raise ValueError(f"latent.lq_former.base={self.base!r} must be 'hidden' or 'selected'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"latent.lq_former.dropout={self.dropout} must be in [0, 1)")


@dataclass
class Thought:
    """One batch of thoughts."""

    vector: Tensor
    """(n, D) the LM inputs for the next slots: g * out + (1 - g) * h, or the top token + g * out (`base`)."""
    indices: Tensor
    """(n, k) selected visual token indices into M, -1 where invalid."""
    relevance: Tensor
    """(n, M) relevance map over the visual tokens, 0 on invisible ones."""
    gate: Tensor
    """(n, 1) how much of the LQ-Former output the thought takes."""


class _Attention(nn.Module):
    """Multi-head attention of x over ctx, with an optional key mask; a row with no key gets 0."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"latent.lq_former.heads={heads} must divide the LM width {dim}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None, mc: RowDropout | None = None) -> Tensor:
        n, Q, D = x.shape
        K, H = ctx.shape[1], self.heads
        q = self.q(x).view(n, Q, H, D // H).transpose(1, 2)  # (n, H, Q, D/H)
        k, v = self.kv(ctx).view(n, K, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 × (n, H, K, D/H)
        mask = has_ctx = None
        if ctx_mask is not None:
            has_ctx = ctx_mask.any(-1)  # (n,)
            # a row with nothing to attend to attends to everything, then its result is zeroed (never NaN)
            mask = (ctx_mask | ~has_ctx[:, None])[:, None, None, :]  # (n, 1, 1, K)
        if mc is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        else:  # the same attention with each row's weights dropped by its own generator (MC dropout)
            scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5  # (n, H, Q, K)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = mc(scores.softmax(-1)) @ v  # (n, H, Q, D/H)
        y = y.transpose(1, 2).reshape(n, Q, D)  # (n, Q, D)
        if has_ctx is not None:
            y = torch.where(has_ctx[:, None, None], y, 0.0)  # (n, Q, D)
        return self.out(y)  # (n, Q, D)


class _Layer(nn.Module):
    """Pre-norm: self-attention over the queries, cross-attention to the visual context, MLP."""

    def __init__(self, dim: int, cfg: LQFormerConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, cfg.heads, cfg.dropout)
        self.cross_attn = _Attention(dim, cfg.heads, cfg.dropout)
        hidden = max(1, round(dim * cfg.mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, dim), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor, mc: RowDropout | None = None) -> Tensor:
        h = self.norm1(x)  # (n, Q+1, D)
        x = x + self.self_attn(h, h, None, mc)  # (n, Q+1, D) queries attend to each other
        x = x + self.cross_attn(self.norm2(x), ctx, ctx_mask, mc)  # (n, Q+1, D) ... and to the visual context
        y = self.norm3(x)
        for part in self.mlp:  # its dropouts follow MC dropout's masks when it runs
            y = mc(y) if mc is not None and isinstance(part, nn.Dropout) else part(y)
        return x + y  # (n, Q+1, D)


class LQFormer(nn.Module):
    """(h, visual tokens, mask) -> the next latent thought."""

    def __init__(self, cfg: LQFormerConfig, hidden_size: int):
        super().__init__()
        D = hidden_size
        self.cfg = cfg
        self.selector = TokenSelector(cfg.selection, D)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, D) * 0.02)  # (Q, D)
        self.h_in = nn.Linear(D, D)  # h -> the extra query
        self.ctx_norm = nn.LayerNorm(D)
        self.layers = nn.ModuleList(_Layer(D, cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        self.h_out = nn.Linear(D, D)  # the h-query's output -> LM space
        self.gate = nn.Linear(2 * D, 1)  # [h; out] -> gate logit
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, cfg.gate_init)

    @staticmethod
    def _top_token(visual: Tensor, indices: Tensor) -> Tensor:
        """visual (n, M, D), indices (n, k) -> (n, D) the most relevant token as it is (zero where none).

        Without the selector's straight-through factor, so the LM loss cannot rescale the token it is
        handed by reshaping the relevance; the selection learns through the LQ-Former's context and the
        selection loss."""
        top = indices[:, 0]  # (n,)
        token = visual[torch.arange(len(top), device=visual.device), top.clamp_min(0)]  # (n, D)
        return torch.where((top >= 0)[:, None], token, 0.0)

    def forward(self, h: Tensor, visual: Tensor, visual_mask: Tensor, mc: RowDropout | None = None) -> Thought:
        """h (n, D) hidden states at p-1; visual (n, M, D) LM-space visual tokens; visual_mask (n, M) bool
        (visible to this slot) -> thoughts for slots p. `mc`: MC dropout at every dropout site, row by row."""
        n, D = h.shape
        selected, selected_mask, indices, relevance = self.selector(h, visual, visual_mask)  # (n, k, D), (n, k), ...
        summary = torch.einsum("nm,nmd->nd", relevance, visual)[:, None]  # (n, 1, D) relevance-weighted mean
        ctx = torch.cat([selected, summary], dim=1)  # (n, k+1, D)
        ctx_mask = torch.cat([selected_mask, visual_mask.any(-1, keepdim=True)], dim=1)  # (n, k+1)
        ctx = self.ctx_norm(ctx)  # (n, k+1, D)
        x = torch.cat([self.queries[None].expand(n, -1, -1), self.h_in(h)[:, None]], dim=1)  # (n, Q+1, D)
        for layer in self.layers:
            x = layer(x, ctx, ctx_mask, mc)  # (n, Q+1, D)
        out = self.h_out(self.norm(x[:, -1]))  # (n, D) the h-query's output
        g = torch.sigmoid(self.gate(torch.cat([h, out], dim=-1)))  # (n, 1)
        if self.cfg.base == "hidden":
            vector = g * out + (1 - g) * h  # (n, D)
        else:  # the selected token always enters in full; the gate says how much of the output to add
            vector = self._top_token(visual, indices) + g * out  # (n, D)
        return Thought(vector=vector, indices=indices, relevance=relevance, gate=g)
