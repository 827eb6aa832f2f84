"""`lmm convert`: published checkpoints in (six layouts, four families), transformers folders out.

Each family's `convert` module does the work; this module picks it by layout (import), by the
recipe's model class (export) or by the `lmm.yaml` an import wrote (`load_imported`).

| layout | family | source |
|---|---|---|
| `mantis` | llava | Mantis (transformers Llava layout, CLIP/SigLIP + Llama-3) |
| `llava_qwen` | llava | LLaVA-NeXT / OneVision as MAmmoTH-VL publishes it |
| `mipha` | llava | Mipha / LLaVA-Phi |
| `cheetah` | qformer | Cheetah's LAVIS `.pth` files (+ BLIP-2, EVA and a frozen LLM) |
| `idefics2` | idefics2 | transformers Idefics2 (Mantis-Idefics2) |
| `fuyu` | fuyu | transformers Fuyu (Mantis-Fuyu) |
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import yaml

from lmm.families.base import LMMModule

LAYOUTS: dict[str, str] = {
    "mantis": "llava",
    "llava_qwen": "llava",
    "mipha": "llava",
    "cheetah": "qformer",
    "idefics2": "idefics2",
    "fuyu": "fuyu",
}
EXPORTS = ("llava", "fuyu")  # families with an `export_hf` (transformers folder out)


def _family_convert(family: str):
    return importlib.import_module(f"lmm.families.{family}.convert")


def import_checkpoint(layout: str, src: str | Path, out: str | Path, **options) -> Path:
    """Import `src` (a checkpoint of `layout`) into lmm's layout under `out`; return its lmm.yaml.

    `options` go to the family's importer: `tokenizer` (all), `vision_config` (llava_qwen),
    `llm`, `blip2`, `eva`, `template`, `update_layer` (cheetah).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    family = LAYOUTS[layout]
    options = {k: v for k, v in options.items() if v is not None}
    convert = _family_convert(family)
    if family == "llava":
        return convert.import_checkpoint(src, out, layout, **options)
    if family == "qformer":
        if "llm" not in options:
            raise ValueError("the cheetah layout needs the frozen LLM's folder: pass --llm")
        return convert.import_checkpoint(src, out, **options)
    unknown = set(options) - {"tokenizer"}
    if unknown:
        raise ValueError(f"layout {layout} takes no {sorted(unknown)}; only --tokenizer")
    return convert.import_checkpoint(src, out, **options)


def family_of(recipe: str | Path) -> str:
    """The family (`llava`, `qformer`, `idefics2`, `fuyu`) of a recipe's `model.class_path`."""
    config = yaml.safe_load(Path(recipe).read_text()) or {}
    class_path = str((config.get("model") or {}).get("class_path", ""))
    parts = class_path.split(".")
    if len(parts) < 3 or parts[:2] != ["lmm", "families"]:
        raise ValueError(
            f"{recipe}: model.class_path {class_path!r} is not an lmm family "
            "(expected lmm.families.<family>.<Module>)"
        )
    return parts[2]


def load_imported(out: str | Path) -> LMMModule:
    """The module a `lmm convert import` folder describes, with every imported weight loaded."""
    recipe = Path(out) / "lmm.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(
            f"{out}: no lmm.yaml; is it a folder written by lmm convert import?"
        )
    return _family_convert(family_of(recipe)).load_imported(out)


def export(recipe: str | Path, out: str | Path, ckpt: str | Path | None = None) -> Path:
    """Write the recipe's model (weights from `ckpt` if given) as a transformers folder."""
    from lmm.families.recipe import build_module, load_weights

    family = family_of(recipe)
    if family not in EXPORTS:
        raise ValueError(
            f"{recipe}: export to transformers exists for the {' and '.join(EXPORTS)} families, "
            f"not {family}; save its weights with the Lightning checkpoint instead"
        )
    module = build_module(yaml.safe_load(Path(recipe).read_text()), str(recipe))
    if ckpt is not None:
        load_weights(module, Path(ckpt), str(recipe))
    return _family_convert(family).export_hf(module.eval(), out)


def main(argv: list[str] | None = None) -> Path:
    """`lmm convert import|export` (docs/convert.md)."""
    parser = argparse.ArgumentParser(
        prog="lmm convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="published checkpoint → lmm folders + lmm.yaml")
    imp.add_argument("--layout", required=True, choices=list(LAYOUTS))
    imp.add_argument("--src", required=True, type=Path, help="checkpoint folder or file")
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--tokenizer", help="tokenizer folder (default: the source's)")
    imp.add_argument("--vision-config", help="llava_qwen: the vision tower's folder/config.json")
    imp.add_argument("--llm", help="cheetah: the frozen LLM's folder (Vicuna / LLaMA-2)")
    imp.add_argument("--blip2", help="cheetah: the BLIP-2 .pth (Q-Former, vision)")
    imp.add_argument("--eva", help="cheetah: the EVA ViT .pth")
    imp.add_argument("--template", choices=["vicuna", "llama2"], help="cheetah: the prompt")
    imp.add_argument("--update-layer", type=int, help="cheetah: VPG-C's decoder layer")
    exp = sub.add_parser("export", help="lmm model → transformers folder (llava, fuyu)")
    exp.add_argument("--config", required=True, type=Path, help="the recipe of the model")
    exp.add_argument("--ckpt", type=Path, help="Lightning .ckpt or .safetensors state dict")
    exp.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "export":
        return export(args.config, args.out, args.ckpt)
    return import_checkpoint(
        args.layout,
        args.src,
        args.out,
        tokenizer=args.tokenizer,
        vision_config=args.vision_config,
        llm=args.llm,
        blip2=args.blip2,
        eva=args.eva,
        template=args.template,
        update_layer=args.update_layer,
    )
