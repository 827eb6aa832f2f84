"""Connectors: project vision features into the LLM's embedding space (LLaVA's projector)."""

from __future__ import annotations

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
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        """
        Args:
            in_dim: width of the vision features.
            out_dim: width of the LLM embeddings.
            depth: number of linear layers (2 = mlp2x_gelu).
        """
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPConnector depth must be >= 1, got {depth}")
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth
        self.act = nn.GELU()
        for i in range(1, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(in_dim if i == 1 else out_dim, out_dim))

    def forward(self, features: Tensor) -> Tensor:  # [N, T, in] -> [N, T, out]
        x = self.linear_1(features)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x
