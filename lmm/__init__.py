"""lmm: train, evaluate and chat with large multimodal models on PyTorch Lightning."""

__version__ = "0.1.0"

__all__ = ["LMM", "load"]


def __getattr__(name: str):
    # `lmm.load` / `lmm.LMM` without importing torch and transformers on `import lmm`.
    if name in __all__:
        from lmm import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmm' has no attribute {name!r}")
