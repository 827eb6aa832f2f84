"""Objectives: what an `LMMModule` trains its family model for, and what its eval steps give.

`LanguageModel` (the default): next-token loss on the trained tokens; validation loss; test and
predict generate answers. `Scores`: a score head on the last non-pad token (VideoScore); the
loss, metrics and predictions are scores. The module holds one objective and never asks which.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from lmm.components.losses import selected_lm_loss, trained_positions
from lmm.components.score_head import Problem, ScoreConfig, ScoreHead, ScoreMetrics
from lmm.data.batch import Batch
from lmm.families.model import forward_arguments

LMMModule = L.LightningModule  # an lmm.training.module.LMMModule (which imports this module)


class Objective(nn.Module):
    """The loss of a batch and the outputs of val/test/predict steps (`LMMModule` calls them)."""

    def bind(self, module: LMMModule) -> None:
        """Called once the family model is built (a head needs the LLM's width)."""

    def parts(self) -> dict[str, nn.Module]:
        """Parts the objective adds (trained, frozen and given learning rates like the model's)."""
        return {}

    def loss(self, module: LMMModule, batch: Batch) -> tuple[Tensor, Tensor]:
        """Summed loss of the batch and the count it is a mean over."""
        raise NotImplementedError

    def head_tokens(self, module: LMMModule, batch: Batch) -> int:
        """Positions at which a training step computes vocabulary logits (FLOP counting)."""
        raise NotImplementedError

    def validation_step(self, module: LMMModule, batch: Batch) -> Tensor | None:
        raise NotImplementedError

    def test_step(self, module: LMMModule, batch: Batch) -> list[dict]:
        """One record per row: the prediction and what it is scored against."""
        raise NotImplementedError

    def predict_step(self, module: LMMModule, batch: Batch) -> list[dict]:
        raise NotImplementedError

    def epoch_end(self, module: LMMModule, split: str) -> None:
        """Log what the objective accumulated over a val/test epoch."""


class LanguageModel(Objective):
    """Next-token loss where labels are trained; answers generated at test and predict."""

    def loss(self, module: LMMModule, batch: Batch) -> tuple[Tensor, Tensor]:
        """The family model computes logits only where a next token is trained (`logits_at`):
        prompt, image and pad positions never reach the vocabulary projection."""
        at, targets = trained_positions(batch.labels)
        model = module.model
        if "logits_at" in forward_arguments(type(model)):
            logits = module(batch, logits_at=at)
        else:  # a family model without the argument: every position, then select
            logits = module(batch)[at]
        return selected_lm_loss(logits, targets)

    def head_tokens(self, module: LMMModule, batch: Batch) -> int:
        if not module.model.llm.selects_logits:  # the LLM's own head runs everywhere
            return batch.num_tokens
        return int((batch.labels[:, 1:] != -100).sum())

    def validation_step(self, module: LMMModule, batch: Batch) -> Tensor:
        loss, _ = module.loss(batch)
        module.log(
            "val/loss",
            loss,
            prog_bar=True,
            batch_size=len(batch),
            sync_dist=True,
            add_dataloader_idx=False,
        )
        return loss

    def test_step(self, module: LMMModule, batch: Batch) -> list[dict]:
        """One record per row: id, the record's `task`, prompt, answer and reference ("" if
        the record has none)."""
        rows = self.predict_step(module, batch)
        for row, meta in zip(rows, batch.meta, strict=True):
            row["task"] = meta.get("task")
            row["reference"] = row.get("reference") or ""
        return rows

    def predict_step(self, module: LMMModule, batch: Batch) -> list[dict]:
        """One record per row: id, prompt (templated, media as `<image>`), the generated
        answer, and the record's reference answer and `task` where it has them."""
        answers = module.generate(batch, max_new_tokens=batch.max_new_tokens)
        return [_record(batch, b, prediction=answer) for b, answer in enumerate(answers)]


class Scores(Objective):
    """A score head on each row's last non-pad token (VideoScore); see `ScoreConfig` for the
    arguments. The module then trains on scored records (the head's loss only) and tests and
    predicts scores by label; its LM head is frozen (it is never read)."""

    def __init__(
        self,
        labels: list[str],
        problem: Problem = "regression",
        bias: bool = False,
        init_std: float = 0.02,
    ):
        """
        Args:
            labels: the head's outputs in target order (the data's `labels`).
            problem: `regression`, `single_label` or `multi_label` (transformers' problem_type).
            bias: give the linear head a bias (VideoScore's has none).
            init_std: std of the head weight's normal initialisation.
        """
        super().__init__()
        self.config = ScoreConfig(list(labels), problem, bias, init_std)
        self.head: ScoreHead | None = None
        self.metrics = nn.ModuleDict(
            {split: ScoreMetrics(self.config) for split in ("val", "test")}
        )

    def bind(self, module: LMMModule) -> None:
        model = module.model
        if "return_hidden" not in forward_arguments(type(model)):
            raise TypeError(
                f"{type(model).__name__}.forward has no `return_hidden` argument, which a score "
                "head needs (the LLM's last hidden states instead of logits); add it to the "
                "family model (docs/families.md, 'Score heads')"
            )
        llm = model.llm
        self.head = ScoreHead(llm.hidden_size, self.config)
        head = llm.get_output_embeddings()
        # Never read: frozen (unless tied to the embeddings). A trainable parameter without a
        # gradient has no optimizer state, and a sharded (FSDP2) checkpoint then fails to load.
        if head is not None and head.weight is not llm.model.get_input_embeddings().weight:
            head.requires_grad_(False)

    def parts(self) -> dict[str, nn.Module]:
        return {"score": self.head}

    def scores(self, module: LMMModule, batch: Batch) -> Tensor:
        """The head's raw outputs `[B, n_labels]` at each row's last non-pad token."""
        if batch.packed:
            raise ValueError(
                f"batch {batch.ids[:2]}...: score heads need padded batches (one sample per row, "
                "scored at its last token), not packed rows; set data.init_args.pack_tokens: null"
            )
        return self.head(module(batch, return_hidden=True), batch.attention_mask)

    def loss(self, module: LMMModule, batch: Batch) -> tuple[Tensor, Tensor]:
        scores = self.scores(module, batch)
        if batch.targets is None:
            raise ValueError(
                f"batch {batch.ids[:2]}... has no score targets, but the module has a score head "
                f"({self.config.labels}); train it on scored records (Mantis `classification`: "
                "`prompt` + `labels`), or use the LanguageModel objective to train a chat model"
            )
        return self.head.loss(scores, batch.targets)

    def head_tokens(self, module: LMMModule, batch: Batch) -> int:
        return len(batch)

    def validation_step(self, module: LMMModule, batch: Batch) -> Tensor | None:
        return self._evaluate(module, batch, "val")[0]

    def test_step(self, module: LMMModule, batch: Batch) -> list[dict]:
        return self._evaluate(module, batch, "test")[1]

    def _evaluate(self, module: LMMModule, batch: Batch, split: str) -> tuple[Tensor | None, list]:
        """The loss and metrics where the batch has targets, and the prediction records."""
        scores = self.scores(module, batch)
        predictions = self.head.predictions(scores)
        loss = None
        if batch.targets is not None:
            loss_sum, n = self.head.loss(scores, batch.targets)
            loss = loss_sum / n
            self.metrics[split].update(predictions, batch.targets)
            module.log(
                f"{split}/loss",
                loss,
                prog_bar=split == "val",
                batch_size=len(batch),
                sync_dist=True,
                add_dataloader_idx=False,
            )
        return loss, self.rows(batch, predictions)

    def predict_step(self, module: LMMModule, batch: Batch) -> list[dict]:
        return self.rows(batch, self.head.predictions(self.scores(module, batch)))

    def rows(self, batch: Batch, predictions: Tensor) -> list[dict]:
        """One prediction record per row: its scores by label (and its targets, if any)."""
        labels = self.config.labels
        out = []
        for b in range(len(batch.ids)):
            row = _record(batch, b, scores=dict(zip(labels, predictions[b].tolist(), strict=True)))
            row.pop("reference", None)  # a scored record's answer is its targets
            if self.config.problem == "single_label":
                row["prediction"] = labels[int(predictions[b].argmax())]
            if batch.targets is not None:
                row["targets"] = dict(zip(labels, batch.targets[b].tolist(), strict=True))
            out.append(row)
        return out

    def epoch_end(self, module: LMMModule, split: str) -> None:
        """Log `{split}/score/<metric>[/<label>]` (Spearman, MSE or accuracy) if any rank scored."""
        metrics = self.metrics[split]
        seen = module.trainer.strategy.reduce(
            torch.tensor(float(metrics.seen), device=module.device), reduce_op="sum"
        )
        if float(seen) < 2:  # a rank correlation needs two samples
            metrics.reset()
            return
        results = metrics.compute()
        metrics.reset()
        module.log_dict(
            {f"{split}/score/{k}": v for k, v in results.items()}, add_dataloader_idx=False
        )


def _record(batch: Batch, b: int, **outputs) -> dict:
    """Row `b` of a prompt batch as a prediction record: id, prompt, `outputs`, and the
    record's reference and `task` where it has them."""
    row: dict = {"id": batch.ids[b]}
    if b < len(batch.prompts) and batch.prompts[b] is not None:
        row["prompt"] = batch.prompts[b]
    row.update(outputs)
    if b < len(batch.references) and batch.references[b] is not None:
        row["reference"] = batch.references[b]
    if b < len(batch.meta) and batch.meta[b].get("task") is not None:
        row["task"] = batch.meta[b]["task"]
    return row
