"""The one logger of lmm: rank-aware, so that only rank 0 speaks unless asked."""

from __future__ import annotations

import logging
import os

_ROOT = "lmm"


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or _rank() == 0


def get_logger(name: str) -> logging.Logger:
    """Return the logger for module `name` under the `lmm` root (rank 0 only by default).

    Pass `extra={"all_ranks": True}` to a call to log from every rank.
    """
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lmm %(levelname)s] %(message)s"))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("LMM_LOG_LEVEL", "INFO"))
        root.propagate = False
    if name == _ROOT or name.startswith(_ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{_ROOT}.{name}")
