"""The family registry: each family declares itself once (its package's `FAMILY`), and
`lmm convert`, `lmm.load` and the CLI read these declarations.

A family `lmm/families/<name>/` declares in its `__init__.py`:

    FAMILY = Family(name, model="lmm.families.<name>.<Model>", layouts=(Layout(...), ...),
                    exports_to=("<transformers class>", ...))

A layout that reads transformers folders as `save_pretrained` writes them names their classes
(`Layout.transformers`): `lmm.load` and `init_from_transformers` take such folders directly
(`lmm.families.hf`).

and its `convert.py` holds `import_checkpoint(src, out, **options)` (plus `layout=` when it reads
several layouts), writing lmm's layout and a recipe (`lmm.yaml`) that builds the model with
every imported weight (`init_from` where they are not in transformers folders), and, if it
exports, `export_hf(module, out)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import yaml

FAMILIES = ("llava", "qformer", "idefics2", "fuyu", "qwen2_5_vl")  # every family package, by name


class ExportError(ValueError):
    """An lmm setting the target transformers class cannot express (`lmm convert export` exits 2
    with this one-line message)."""


@dataclass(frozen=True, eq=False)
class Layout:
    """A published checkpoint layout a family imports (`lmm convert import --layout NAME`)."""

    name: str
    source: str  # what it is, for the CLI's help
    template: str  # the data template its models were trained with (a hint in lmm.yaml)
    options: dict[str, str] = field(default_factory=lambda: {"tokenizer": TOKENIZER})
    # transformers classes (config.json `architectures`) whose folders this layout reads as
    # they are: `lmm.load(folder)` and `init_from_transformers` take them with no convert step
    transformers: tuple[str, ...] = ()
    # the chat template of an import whose source has no chat template lmm recognises
    # (class path, or {class_path, init_args}); None: the importer's own, else none
    default_template: str | dict | None = None


TOKENIZER = "tokenizer folder (default: the source's)"


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: its name, model class, import layouts and export target."""

    name: str
    model: str  # dotted path of its FamilyModel class
    layouts: tuple[Layout, ...] = ()
    exports_to: tuple[str, ...] = ()  # the transformers classes `lmm convert export` writes

    def convert(self) -> ModuleType:
        return importlib.import_module(f"lmm.families.{self.name}.convert")

    def import_checkpoint(self, layout: str, src: str | Path, out: str | Path, **options) -> Path:
        """Import `src` (a checkpoint of `layout`) into lmm's layout under `out`; its lmm.yaml."""
        known = {lay.name: lay for lay in self.layouts}[layout].options
        options = {k: v for k, v in options.items() if v is not None}
        unknown = set(options) - set(known)
        if unknown:
            allowed = ", ".join(f"--{k.replace('_', '-')}" for k in known)
            raise ValueError(f"layout {layout} takes no {sorted(unknown)}; only {allowed}")
        if len(self.layouts) > 1:
            options["layout"] = layout
        return self.convert().import_checkpoint(src, out, **options)

    def export(self, module, out: str | Path) -> Path:
        if not self.exports_to:
            names = [f.name for f in families() if f.exports_to]
            exporting = ", ".join(names[:-1]) + f" and {names[-1]}"
            raise ExportError(
                f"export to transformers exists for the {exporting} families, not {self.name}; "
                "keep its weights in the Lightning checkpoint"
            )
        return self.convert().export_hf(module.eval(), out)


def family(name: str) -> Family:
    """The declaration of family `name` (its package's `FAMILY`)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; families: {', '.join(FAMILIES)}")
    return importlib.import_module(f"lmm.families.{name}").FAMILY


def families() -> list[Family]:
    return [family(name) for name in FAMILIES]


def layouts() -> dict[str, Family]:
    """Every import layout and the family that reads it."""
    return {lay.name: f for f in families() for lay in f.layouts}


def transformers_classes() -> dict[str, tuple[Family, Layout]]:
    """Every transformers class whose folders lmm reads directly, with its family and layout."""
    return {cls: (f, lay) for f in families() for lay in f.layouts for cls in lay.transformers}


def family_of_model(class_path: str) -> Family:
    """The family whose package holds the model class `class_path` (`lmm.families.<name>.…`)."""
    parts = class_path.split(".")
    if len(parts) < 3 or parts[:2] != ["lmm", "families"] or parts[2] not in FAMILIES:
        raise ValueError(
            f"model class {class_path!r} is not an lmm family model (lmm.families.<family>.<Model>; "
            f"families: {', '.join(FAMILIES)})"
        )
    return family(parts[2])


def component(class_path: str, **init_args) -> dict:
    """A recipe entry that builds `class_path(**init_args)`."""
    return (
        {"class_path": class_path, "init_args": init_args}
        if init_args
        else {"class_path": class_path}
    )


def import_recipe(
    header: list[str],
    model: dict,
    tokenizer: str,
    template: str | None = None,
    **module_args,
) -> str:
    """The text of an import's `lmm.yaml`: `LMMModule(model=model, tokenizer=...)` with the
    `module_args` (e.g. `init_from`), the data template if given, under `header` comments."""
    config: dict = {
        "model": component("lmm.LMMModule", tokenizer=tokenizer, model=model, **module_args)
    }
    if template is not None:
        config["data"] = component("lmm.data.datamodule.ChatDataModule", template=template)
    comments = "".join(f"# {line}\n" for line in header)
    return comments + yaml.safe_dump(config, sort_keys=False)
