"""Optimisation pieces: parameter groups per model part, and the warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Linear warmup from 0, then cosine decay to `min_ratio` × the peak learning rate."""

    def __init__(self, warmup: float = 0.03, min_ratio: float = 0.0):
        """
        Args:
            warmup: warmup length: a fraction of the total steps if < 1, else a step count.
            min_ratio: final learning rate as a fraction of the peak.
        """
        self.warmup = warmup
        self.min_ratio = min_ratio

    def __call__(self, optimizer: Optimizer, total_steps: int) -> LambdaLR:
        total = max(1, int(total_steps))
        warm = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        return LambdaLR(optimizer, factor)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def param_groups(
    parts: Mapping[str, nn.Module],
    base_lr: float,
    part_lr: Mapping[str, float] | None = None,
) -> list[dict]:
    """One group per (part, decay/no-decay) of trainable parameters, with the part's lr.

    Biases, norms and 1-D parameters get weight decay 0; the others keep the optimizer's.
    Parts with no trainable parameter are left out. A name in `part_lr` that is not a part raises.
    """
    part_lr = dict(part_lr or {})
    unknown = set(part_lr) - set(parts)
    if unknown:
        raise ValueError(f"part_lr names unknown parts {sorted(unknown)}; parts: {sorted(parts)}")
    groups = []
    for part, module in parts.items():
        lr = part_lr.get(part, base_lr)
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(name, p) else decay).append(p)
        if decay:
            groups.append({"params": decay, "lr": lr, "name": part})
        if no_decay:
            groups.append(
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}/no_decay"}
            )
    return groups
