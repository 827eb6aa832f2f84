"""Shared builders for tests: a tiny LlavaModule and a connected data module."""

from __future__ import annotations

from pathlib import Path

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.data.datamodule import ChatDataModule
from lmm.data.templates import Llama3
from lmm.families.llava import LlavaModel, LlavaModule


def tiny_llava(assets: dict[str, Path], **kwargs) -> LlavaModule:
    model = LlavaModel(
        vision=HFVisionTower(str(assets["vision"]), feature_layer=-2),
        llm=CausalLM(str(assets["llm"])),
        connector=MLPConnector,
    )
    return LlavaModule(model=model, tokenizer=str(assets["tokenizer"]), **kwargs)


def tiny_data(data: Path, module: LlavaModule | None = None, **kwargs) -> ChatDataModule:
    dm = ChatDataModule(
        template=Llama3(),
        train=str(data / "train.json"),
        val=str(data / "val.json"),
        test=str(data / "test.json"),
        **kwargs,
    )
    if module is not None:
        dm.connect(module.tokenizer, module.media_spec(), module.image_token)
    return dm
