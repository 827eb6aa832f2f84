"""Score heads (VideoScore): a linear head on each row's last non-pad token, losses, metrics."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy
from torchmetrics.regression import MeanSquaredError, SpearmanCorrCoef

Problem = Literal["regression", "single_label", "multi_label"]
PROBLEMS: tuple[str, ...] = ("regression", "single_label", "multi_label")


@dataclass
class ScoreConfig:
    """A score head on the last non-pad token, for any family (recipe: `model.init_args.score`).

    With a score head the module trains, validates, tests and predicts scores instead of text:
    the training loss is the head's loss only (as VideoScore's `Idefics2ForSequenceClassification`),
    and every batch must carry targets (Mantis `classification` records, `labels: {name: value}`).

    Args:
        labels: names of the head's outputs, in target order: the same list as the data's
            `labels` (VideoScore: visual quality, temporal consistency, dynamic degree,
            text-to-video alignment, factual consistency).
        problem: `regression` (MSE on the raw outputs), `single_label` (cross-entropy: the
            targets of a row are a one-hot or soft distribution over the labels) or
            `multi_label` (binary cross-entropy with logits, one target in [0, 1] per label),
            as transformers' `problem_type`.
        bias: give the linear head a bias (transformers' sequence-classification heads, and
            so VideoScore's, have none).
        init_std: standard deviation of the normal initialisation of the head's weight
            (transformers' `initializer_range`, 0.02 for Llama and Mistral).
    """

    labels: list[str]
    problem: Problem = "regression"
    bias: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError(
                "score.labels is empty: name the head's outputs in target order, e.g. "
                "[visual quality, temporal consistency] (the data's `labels`)"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"score.labels has duplicate names: {self.labels}")
        if self.problem not in PROBLEMS:
            raise ValueError(f"score.problem must be one of {PROBLEMS}, got {self.problem!r}")
        if self.problem == "single_label" and len(self.labels) < 2:
            raise ValueError(
                "score.problem single_label needs 2+ labels (one output per class); "
                "for one output use regression or multi_label"
            )


def last_token_index(attention_mask: Tensor) -> Tensor:  # [B, L] -> [B]
    """Position of each row's last real token (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(dim=1)


class ScoreHead(nn.Module):
    """`Linear(D, n_labels)` on the hidden state of each row's last non-pad token."""

    def __init__(self, hidden_size: int, config: ScoreConfig):
        """
        Args:
            hidden_size: width of the LLM's last hidden states (the input of its `lm_head`).
            config: labels, problem type and initialisation of the head.
        """
        super().__init__()
        self.config = config
        self.proj = nn.Linear(hidden_size, len(config.labels), bias=config.bias)
        nn.init.normal_(self.proj.weight, std=config.init_std)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:  # -> [B, n_labels]
        """Raw scores (values or logits) of hidden states `[B, L, D]` at each row's last token."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, last_token_index(attention_mask)]  # [B, D]
        return self.proj(pooled.to(self.proj.weight.dtype))

    def loss(self, scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Summed per-sample loss and the sample count; their ratio is transformers' mean loss.

        Per sample: regression, the MSE over labels; single_label, the cross-entropy against the
        target distribution; multi_label, the mean binary cross-entropy over labels.
        """
        n = len(self.config.labels)
        if targets.ndim != 2 or targets.shape != scores.shape:
            raise ValueError(
                f"score targets have shape {tuple(targets.shape)} but the head gives "
                f"{tuple(scores.shape)} ({n} labels: {self.config.labels}); the data's `labels` "
                "must be the head's `score.labels`"
            )
        scores, targets = scores.float(), targets.float()
        if self.config.problem == "regression":
            per_sample = ((scores - targets) ** 2).mean(dim=1)
        elif self.config.problem == "single_label":
            per_sample = nn.functional.cross_entropy(scores, targets, reduction="none")
        else:
            per_sample = nn.functional.binary_cross_entropy_with_logits(
                scores, targets, reduction="none"
            ).mean(dim=1)
        return per_sample.sum(), torch.tensor(len(scores), device=scores.device)

    def predictions(self, scores: Tensor) -> Tensor:  # [B, n] -> [B, n]
        """What the scores mean: values (regression), softmax or sigmoid probabilities."""
        scores = scores.float()
        if self.config.problem == "single_label":
            return scores.softmax(dim=-1)
        if self.config.problem == "multi_label":
            return scores.sigmoid()
        return scores


def metric_name(label: str) -> str:
    """A label as a metric key: `text-to-video alignment` → `text_to_video_alignment`."""
    return re.sub(r"\W+", "_", label).strip("_").lower() or "label"


class ScoreMetrics(nn.Module):
    """Spearman ρ per label, plus MSE per label (regression) or accuracy (classification).

    torchmetrics states, so the values sync across ranks. `compute()` gives the mean and the
    per-label values: `spearman`, `spearman/<label>`, `mse`, `mse/<label>` or `accuracy`
    (single_label) / `accuracy`, `accuracy/<label>` (multi_label).
    """

    def __init__(self, config: ScoreConfig):
        """
        Args:
            config: the score head's labels and problem type.
        """
        super().__init__()
        self.config = config
        n = len(config.labels)
        self.names = [metric_name(label) for label in config.labels]
        with warnings.catch_warnings():  # "will save all targets and predictions": it must
            warnings.filterwarnings("ignore", message=".*save all targets", category=UserWarning)
            self.spearman = SpearmanCorrCoef(num_outputs=n)
        self.mse = MeanSquaredError(num_outputs=n) if config.problem == "regression" else None
        self.accuracy: nn.Module | None = None
        if config.problem == "single_label":
            self.accuracy = MulticlassAccuracy(num_classes=n, average="micro")
        elif config.problem == "multi_label":
            self.accuracy = MultilabelAccuracy(num_labels=n, average=None)
        self.seen = 0

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Add a batch: `predictions` from `ScoreHead.predictions`, `targets` `[B, n]`."""
        predictions, targets = predictions.detach().float(), targets.float()
        if len(self.names) == 1:  # torchmetrics wants 1-D inputs for a single output
            values, truth = predictions[:, 0], targets[:, 0]
        else:
            values, truth = predictions, targets
        self.spearman.update(values, truth)
        if self.mse is not None:
            self.mse.update(values, truth)
        if self.config.problem == "single_label":
            self.accuracy.update(predictions.argmax(dim=1), targets.argmax(dim=1))
        elif self.config.problem == "multi_label":
            self.accuracy.update(predictions, (targets >= 0.5).long())
        self.seen += len(predictions)

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        out.update(self._per_label("spearman", self.spearman.compute()))
        if self.mse is not None:
            out.update(self._per_label("mse", self.mse.compute()))
        if self.config.problem == "single_label":
            out["accuracy"] = self.accuracy.compute()
        elif self.config.problem == "multi_label":
            out.update(self._per_label("accuracy", self.accuracy.compute()))
        return out

    def _per_label(self, key: str, values: Tensor) -> dict[str, Tensor]:
        values = values.reshape(-1).float()
        out = {key: values.mean()}
        if len(values) > 1:
            out.update({f"{key}/{n}": v for n, v in zip(self.names, values, strict=True)})
        return out

    def reset(self) -> None:
        # Fresh states must be normal tensors even when reset runs in a validation loop's
        # inference mode: a later update outside it (another loop) could not write to them.
        with torch.inference_mode(False):
            self.spearman.reset()
            if self.mse is not None:
                self.mse.reset()
            if self.accuracy is not None:
                self.accuracy.reset()
        self.seen = 0
