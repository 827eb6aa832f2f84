"""Cheetah checkpoint import: LAVIS `.pth` state dicts (EVA ViT, BLIP-2 Q-Former, VPG-C) → lmm.

Cheetah (DCDmllm/Cheetah) builds its model as MiniGPT-4 does: the EVA ViT-g from
`eva_vit_g.pth`, then `ln_vision`, Q-Former and queries from BLIP-2's
`blip2_pretrained_flant5xxl.pth`, then its own checkpoint (`llama_proj` and VPG-C's
`llama_model.model.{query_tokens, qformer_proj, llm_proj}`) on top, each with
`load_state_dict(strict=False)`; the LLM comes from its own folder. `import_checkpoint` merges
the same files in the same order, maps every key it needs to lmm's qformer family and writes
weights and a recipe. Key map and limits: docs/families.md (Cheetah import).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor
from transformers import (
    AutoConfig,
    Blip2Config,
    Blip2QFormerModel,
    Blip2VisionModel,
)

from lmm.components.vision import CLIP_MEAN, CLIP_STD
from lmm.families.qformer.lavis import (
    CHEETAH_KEYS,
    TEMPLATES,
    Template,
    _check_keys,
    _eva,
    _merge,
    _split,
    qformer_config,
    qformer_to_hf,
    read_pth,
    vision_config,
    vision_to_hf,
)
from lmm.families.registry import component, import_recipe
from lmm.training.checkpoint import save_safetensors
from lmm.utils.logging import get_logger

log = get_logger(__name__)


# LAVIS EVA ViT (`visual_encoder.*`, `ln_vision.*`) → transformers `Blip2VisionModel`.
# --- import ------------------------------------------------------------------------------------


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    llm: str | Path | None = None,
    blip2: str | Path | None = None,
    eva: str | Path | None = None,
    tokenizer: str | Path | None = None,
    template: Template = "vicuna",
    update_layer: int = 16,
    vision_heads: int = 16,
    qformer_heads: int = 12,
    eva_layers: int = 39,
    dtype: str | None = None,
) -> Path:
    """Convert Cheetah's LAVIS checkpoints to lmm's qformer layout in `out`; return `out/lmm.yaml`.

    Args:
        src: Cheetah's `.pth` (`llama_proj`, VPG-C; a whole model's state dict works too).
        out: output folder: `blip2/` (ViT + Q-Former as a transformers BLIP-2),
            `cheetah.safetensors` (projection + VPG-C), `lmm.yaml`.
        llm: folder or hub id of the LLM Cheetah was trained on (Vicuna-7B v0, LLaMA-2-7B-chat).
        blip2: BLIP-2's `.pth` (`blip2_pretrained_flant5xxl.pth`): `ln_vision`, Q-Former,
            queries (and the ViT, if it holds it).
        eva: the EVA ViT `.pth` (LAVIS `eva_vit_g.pth`) if neither file holds the ViT.
        tokenizer: the LLM's tokenizer (default: `llm`).
        template: the prompt of the recipe's data section: `vicuna` or `llama2`.
        update_layer: the decoder layer VPG-C runs at (Cheetah: 16; not in the checkpoint).
        vision_heads: attention heads of the ViT (EVA ViT-g: 16; not in the weights).
        qformer_heads: attention heads of the Q-Former (BERT-base: 12).
        eva_layers: blocks of a bare EVA checkpoint the ViT keeps (BLIP-2's ViT-g: 39 of 40).
        dtype: dtype of the ViT and LLM in the recipe (default: the ViT weights' and the LLM
            config's); the Q-Former stays float32, as BLIP-2 keeps it.
    """
    src, out = Path(src), Path(out)
    if llm is None:
        raise ValueError("the cheetah layout needs the frozen LLM's folder: pass --llm")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    sources = []
    if eva is not None:
        sources.append((str(eva), _eva(read_pth(eva), eva_layers, str(eva))))
    if blip2 is not None:
        sources.append((str(blip2), read_pth(blip2)))
    sources.append((str(src), read_pth(src)))
    parts = _split(_merge(sources))
    given = ", ".join(name for name, _ in sources)

    missing = sorted(set(CHEETAH_KEYS) - set(parts["cheetah"]))
    if missing:
        raise ValueError(
            f"{given}: missing Cheetah's {missing}; pass the Cheetah checkpoint as src"
        )
    found = {
        "the ViT (visual_encoder.*)": any(k.startswith("visual_encoder.") for k in parts["vision"]),
        "ln_vision": "ln_vision.weight" in parts["vision"],
        "the Q-Former (Qformer.bert.*)": any(k.startswith("Qformer.") for k in parts["qformer"]),
        "its queries (query_tokens)": "query_tokens" in parts["qformer"],
    }
    lacking = [what for what, present in found.items() if not present]
    if lacking:
        raise ValueError(
            f"{given}: missing {', '.join(lacking)}; pass blip2=blip2_pretrained_flant5xxl.pth "
            "(and eva=eva_vit_g.pth if neither file holds visual_encoder.*)"
        )
    vision = vision_to_hf(parts["vision"])
    qformer = qformer_to_hf(parts["qformer"])
    vcfg = vision_config(vision, vision_heads)
    qcfg = qformer_config(qformer, qformer_heads)
    _check_keys(Blip2VisionModel, vcfg, vision, f"{given}: vision tower")
    _check_keys(Blip2QFormerModel, qcfg, qformer, f"{given}: Q-Former")
    queries = parts["qformer"]["query_tokens"]
    text_config = AutoConfig.from_pretrained(str(llm))
    cheetah = {CHEETAH_KEYS[k]: v.contiguous() for k, v in parts["cheetah"].items()}
    _check_cheetah(cheetah, queries, qcfg.hidden_size, text_config.hidden_size, given)

    blip2_dir = out / "blip2"
    blip2_dir.mkdir(parents=True, exist_ok=True)
    config = Blip2Config(
        vision_config=vcfg.to_dict(),
        qformer_config=qcfg.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=queries.shape[1],
    )
    config.save_pretrained(blip2_dir)
    tensors = {f"vision_model.{k}": v for k, v in vision.items()}
    tensors |= {f"qformer.{k}": v.float() for k, v in qformer.items()}
    tensors["query_tokens"] = queries.float()
    save_safetensors(tensors, blip2_dir / "model.safetensors")  # checked by checkpoint_tensors
    (blip2_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": vcfg.image_size}
        )
    )
    save_safetensors(cheetah, out / "cheetah.safetensors")  # checked by init_from

    vdtype = dtype or str(vision["embeddings.patch_embedding.weight"].dtype).removeprefix("torch.")
    ldtype = dtype or _config_dtype(text_config)
    recipe = out / "lmm.yaml"
    recipe.write_text(
        _recipe(given, out, str(llm), str(tokenizer or llm), template, update_layer, vdtype, ldtype)
    )
    log.info("imported Cheetah (%s) into %s", given, out)
    return recipe


def _check_cheetah(
    cheetah: dict[str, Tensor], queries: Tensor, d_q: int, d_llm: int, where: str
) -> None:
    """Projection and VPG-C shapes against the Q-Former width, its queries and the LLM width."""
    if queries.ndim != 3 or queries.shape[::2] != (1, d_q):
        raise ValueError(
            f"{where}: query_tokens has shape {tuple(queries.shape)}; expected (1, queries, {d_q})"
        )
    expected = {
        "model.connector.linear.weight": (d_llm, d_q),
        "model.connector.linear.bias": (d_llm,),
        "model.vpgc.query_tokens": tuple(queries.shape),
        "model.vpgc.qformer_proj.weight": (d_q, d_llm),
        "model.vpgc.qformer_proj.bias": (d_q,),
        "model.vpgc.llm_proj.weight": (d_llm, d_q),
        "model.vpgc.llm_proj.bias": (d_llm,),
    }
    wrong = {
        k: tuple(cheetah[k].shape) for k, shape in expected.items() if cheetah[k].shape != shape
    }
    if wrong:
        inverse = {v: k for k, v in CHEETAH_KEYS.items()}
        raise ValueError(
            f"{where}: shapes do not fit a {d_q}-d Q-Former with {queries.shape[1]} queries and a "
            f"{d_llm}-d LLM: "
            + ", ".join(f"{inverse[k]} {s} (expected {expected[k]})" for k, s in wrong.items())
            + "; is llm the LLM this checkpoint was trained on?"
        )


def _config_dtype(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype or "float32").removeprefix("torch.")


def _recipe(
    given: str,
    out: Path,
    llm: str,
    tokenizer: str,
    template: Template,
    update_layer: int,
    vdtype: str,
    ldtype: str,
) -> str:
    """A recipe (model + data template) that builds the imported Cheetah with its weights."""
    blip2 = str((out / "blip2").resolve())
    local = lambda p: str(Path(p).resolve()) if Path(p).exists() else p  # noqa: E731
    model = component(
        "lmm.families.qformer.QFormerModel",
        vision=component("lmm.components.qformer.Blip2VisionTower", path=blip2, dtype=vdtype),
        qformer=component("lmm.components.qformer.QFormer", path=blip2, dtype="float32"),
        llm=component("lmm.components.language.CausalLM", path=local(llm), dtype=ldtype),
        connector=component("lmm.components.connectors.LinearConnector"),
        vpgc=True,
        update_layer=update_layer,
        image_aspect="resize",
    )
    header = [
        f"Cheetah imported from {given} by lmm.families.qformer.convert.import_checkpoint.",
        "blip2/: EVA ViT + ln_vision and Q-Former + queries (transformers BLIP-2 names);",
        "cheetah.safetensors: llama_proj (model.connector), VPG-C (model.vpgc), for init_from.",
        "Cheetah samples its answers: top_p 0.9, temperature 1.0.",
    ]
    return import_recipe(
        header,
        model,
        local(tokenizer),
        TEMPLATES[template],
        max_new_tokens=300,
        init_from=str((out / "cheetah.safetensors").resolve()),
        init_include=[r"model\.connector\..*", r"model\.vpgc\..*"],
    )


# --- loading -----------------------------------------------------------------------------------
