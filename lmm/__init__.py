"""lmm: train, evaluate and chat with large multimodal models on PyTorch Lightning."""

from lmm.utils.logging import quiet_third_party

__version__ = "0.1.0"

quiet_third_party()

__all__ = ["LMM", "LMMModule", "load"]


def __getattr__(name: str):
    # `lmm.load` / `lmm.LMM` / `lmm.LMMModule` (recipes' class_path) without importing torch
    # and transformers on `import lmm`.
    if name == "LMMModule":
        from lmm.training.module import LMMModule

        return LMMModule
    if name in __all__:
        from lmm import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmm' has no attribute {name!r}")
