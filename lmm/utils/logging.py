"""The one logger of lmm: rank-aware, so that only rank 0 speaks unless asked."""

from __future__ import annotations

import logging
import os
import warnings

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


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence third-party log lines that are not the user's concern; each says why.

    Called when `lmm` is imported, before the libraries are.
    """
    # bitsandbytes (imported by peft on every command) looks for an optional fused 4-bit CPU
    # kernel in the `kernels` package and logs a warning when it is absent; it then uses its
    # own CPU path. Nothing is wrong and nothing for the user to do.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward")
    )
    # Lightning advertises its cloud products (litlogger, litmodels) on every run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip:"))
    warnings.filterwarnings(  # Lightning's own use of a torch API it has not updated yet
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    )
    warnings.filterwarnings(  # the summary's size estimate under bf16; the counts are right
        "ignore", message="Precision bf16-mixed is not supported by the model summary"
    )
    # Every command logs to a new `version_N` folder, so the checkpoint a test, predict or
    # resume reads always lies in another run's folder; ModelCheckpoint then keeps its own
    # best/last bookkeeping for the new folder, as it should, and says so on every load.
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
