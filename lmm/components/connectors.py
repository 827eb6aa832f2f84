"""Connectors: project vision features into the LLM's embedding space (LLaVA's projector)."""

from __future__ import annotations

import math

from torch import Tensor, nn


class Connector(nn.Module):
    """Base role: maps `[N, T, in_dim]` vision features to `[N, T', out_dim]` LLM embeddings."""

    in_dim: int
    out_dim: int

    def num_tokens(self, num_vision_tokens: int) -> int:
        """How many LLM tokens `num_vision_tokens` vision tokens become (same, for token-wise MLPs)."""
        return num_vision_tokens


class LinearConnector(Connector):
    """One linear layer (LLaVA-1 `linear`)."""

    def __init__(self, in_dim: int, out_dim: int):
        """
        Args:
            in_dim: width of the vision features.
            out_dim: width of the LLM embeddings.
        """
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, features: Tensor) -> Tensor:  # [N, T, in] -> [N, T, out]
        return self.linear(features)


class MLPConnector(Connector):
    """`mlp{depth}x_gelu`: Linear, then (GELU, Linear) × (depth − 1). Default is LLaVA-1.5's mlp2x_gelu.

    Layers are named `linear_1 … linear_depth`, as transformers' `LlavaMultiModalProjector` names them.
    With `merge=k > 1` the square grid of vision tokens is first regrouped so that each k×k
    block becomes one token of k²·in_dim features ("pixel shuffle", as Idefics3 and
    InternVL do): k² fewer LLM tokens, no information dropped.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, merge: int = 1):
        """
        Args:
            in_dim: width of the vision features.
            out_dim: width of the LLM embeddings.
            depth: number of linear layers (2 = mlp2x_gelu).
            merge: side of the token blocks merged into one token (1 = none, as LLaVA).
        """
        super().__init__()
        if depth < 1 or merge < 1:
            raise ValueError(f"MLPConnector needs depth >= 1 and merge >= 1, got {depth}, {merge}")
        self.in_dim, self.out_dim, self.depth, self.merge = in_dim, out_dim, depth, merge
        self.act = nn.GELU()
        for i in range(1, depth + 1):
            width = in_dim * merge * merge if i == 1 else out_dim
            self.add_module(f"linear_{i}", nn.Linear(width, out_dim))

    def num_tokens(self, num_vision_tokens: int) -> int:
        return num_vision_tokens // (self.merge * self.merge)

    def _merge(self, features: Tensor) -> Tensor:  # [N, T, D] -> [N, T / k², k² D]
        n, t, d = features.shape
        side, k = math.isqrt(t), self.merge
        if side * side != t or side % k:
            raise ValueError(
                f"merge={k} needs a square grid of tokens with a side divisible by {k}, got {t} "
                "tokens (drop the CLS token with select: default)"
            )
        x = features.reshape(n, side // k, k, side // k, k, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (side // k) ** 2, k * k * d)

    def forward(self, features: Tensor) -> Tensor:  # [N, T, in] -> [N, T / merge², out]
        if self.merge > 1:
            features = self._merge(features)
        x = self.linear_1(features)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x
