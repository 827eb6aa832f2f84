"""lmm: train, evaluate and chat with large multimodal models on PyTorch Lightning."""

__version__ = "0.1.0"
