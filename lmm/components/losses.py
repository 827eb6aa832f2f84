"""Losses shared by every family: next-token cross-entropy, whole-batch and per sample."""

from __future__ import annotations

import torch
from torch import Tensor


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy at every position `[B, L]` (0 where the label is -100).

    Position t holds the loss of predicting `labels[t]` from the logits at t − 1; position 0 is 0.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view_as(shift_labels)
    return torch.nn.functional.pad(loss, (1, 0))


def causal_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count.

    logits `[B, L, V]`, labels `[B, L]` aligned with the inputs (shifted here).
    Returns `(loss_sum, n_tokens)`; the mean loss is their ratio.
    """
    return token_losses(logits, labels).sum(), (labels[:, 1:] != -100).sum()


def trained_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Where next-token logits are needed, and the tokens they predict.

    Returns `(at, targets)`: `at` (bool `[B, L]`) marks position t − 1 when `labels[t]` is
    trained; `targets` `[N]` are those labels in row-major order, the order of `logits[at]`.
    """
    trained = labels[:, 1:] != -100
    return torch.nn.functional.pad(trained, (0, 1)), labels[:, 1:][trained]


def selected_lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of logits `[N, V]` taken at `trained_positions`, and the count N.

    Equal to `causal_lm_loss` on the full logits: the positions left out carry no loss.
    """
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, torch.tensor(targets.numel(), device=targets.device)
