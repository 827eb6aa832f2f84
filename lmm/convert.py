"""`lmm convert`: published checkpoints in, transformers folders out.

Each family declares its import layouts and export targets once (`lmm.families.registry`); its
`convert` module does the work. An import writes lmm's layout and a recipe, `lmm.yaml`, that
builds the model with every imported weight and names the data template that matches the
source's chat template: `lmm.load(out)` and `--config out/lmm.yaml` read it. Transformers
folders of the classes `lmm.load` takes directly need no import (`lmm.families.hf`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lmm.families.hf import add_template, resolve, transformers_class
from lmm.families.registry import ExportError, Family, family_of_model, layouts


def import_checkpoint(layout: str, src: str | Path, out: str | Path, **options) -> Path:
    """Import `src` (a checkpoint of `layout`) into lmm's layout under `out`; return its lmm.yaml.

    `options` go to the family's importer (each layout lists its own, e.g. `tokenizer`,
    `vision_config` for llava_qwen, `llm`, `blip2`, `eva`, `template`, `update_layer` for cheetah).
    """
    known = layouts()
    if layout not in known:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(known)}")
    family = known[layout]
    recipe = family.import_checkpoint(layout, src, out, **options)
    add_template(recipe, src, next(lay for lay in family.layouts if lay.name == layout))
    return recipe


def family_of(recipe: str | Path) -> Family:
    """The family of a recipe's model (`model.init_args.model.class_path`, or the class of its
    `init_from_transformers` folder)."""
    config = yaml.safe_load(Path(recipe).read_text()) or {}
    module = config.get("model") or {}
    args = module.get("init_args") or {}
    if args.get("init_from_transformers"):
        return transformers_class(resolve(args["init_from_transformers"]))[1]
    model = args.get("model") or {}
    class_path = str(model.get("class_path", "") if isinstance(model, dict) else "")
    try:
        return family_of_model(class_path)
    except ValueError as err:
        raise ValueError(f"{recipe}: model.init_args.model: {err}") from None


def load_imported(out: str | Path):
    """The module a `lmm convert import` folder describes (its lmm.yaml), every weight loaded."""
    from lmm.training.recipe import module_from_recipe

    recipe = Path(out) / "lmm.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(
            f"{out}: no lmm.yaml; is it a folder written by lmm convert import?"
        )
    return module_from_recipe(recipe)


def export(recipe: str | Path, out: str | Path, ckpt: str | Path | None = None) -> Path:
    """Write the recipe's model (weights from `ckpt` if given) as a transformers folder."""
    from lmm.training.recipe import build_module, load_weights

    family = family_of(recipe)
    if not family.exports_to:
        family.export(None, out)  # names the families that export
    module = build_module(yaml.safe_load(Path(recipe).read_text()), str(recipe))
    if ckpt is not None:
        load_weights(module, Path(ckpt), str(recipe))
    return family.export(module, out)


def main(argv: list[str] | None = None) -> Path:
    """`lmm convert import|export` (docs/convert.md)."""
    known = layouts()
    table = "\n".join(
        f"  {lay.name:12} {f.name:9} {lay.source}"
        for f in dict.fromkeys(known.values())
        for lay in f.layouts
    )
    parser = argparse.ArgumentParser(
        prog="lmm convert",
        description=f"{__doc__}\nlayouts (layout, family, source):\n{table}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="published checkpoint → lmm folders + lmm.yaml")
    imp.add_argument("--layout", required=True, choices=list(known))
    imp.add_argument("--src", required=True, type=Path, help="checkpoint folder or file")
    imp.add_argument("--out", required=True, type=Path)
    options: dict[str, list[str]] = {}
    for name, family in known.items():
        for option, text in next(lay for lay in family.layouts if lay.name == name).options.items():
            options.setdefault(option, []).append(f"{name}: {text}")
    for option, texts in options.items():
        kind = int if option == "update_layer" else str
        imp.add_argument(f"--{option.replace('_', '-')}", type=kind, help="; ".join(texts))
    exporting = [f.name for f in dict.fromkeys(known.values()) if f.exports_to]
    exp = sub.add_parser("export", help=f"lmm model → transformers folder ({', '.join(exporting)})")
    exp.add_argument("--config", required=True, type=Path, help="the recipe of the model")
    exp.add_argument("--ckpt", type=Path, help="Lightning .ckpt or .safetensors state dict")
    exp.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "export":
        try:
            return export(args.config, args.out, args.ckpt)
        except ExportError as err:  # a setting transformers cannot express: the user's to change
            sys.stderr.write(f"lmm convert export: {err}\n")
            raise SystemExit(2) from None
    given = {k: getattr(args, k) for k in options}
    return import_checkpoint(args.layout, args.src, args.out, **given)
