"""The `lmm` command: LightningCLI (fit / validate / test / predict) and tools (synth, tiny, demo)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from transformers.utils import logging as hf_logging

from lmm.components.pretrained import empty_init
from lmm.families.hf import import_transformers
from lmm.training.module import LMMModule
from lmm.utils import allocator, errors
from lmm.utils.logging import get_logger

log = get_logger(__name__)


class LMMArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with short errors: the problem, the closest known option for an
    unknown one, and where the options are listed (not the 100-line usage)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        hint = ""
        unknown = re.findall(r"(--[\w.\-]+)", message) if "unrecognized" in message else []
        if unknown:
            known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1, cutoff=0.6)
            if close:
                hint = f" Did you mean {close[0]}?"
        sys.stderr.write(
            f"lmm: error: {message.strip()}.{hint}\n(`{prog} --help` lists the options)\n"
        )
        raise SystemExit(errors.EXIT_USER_ERROR)


class LMMCLI(LightningCLI):
    """LightningCLI in subclass mode: the recipe names the family module and the data module."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs):
        # the `lmm` command passes its own argument list on purpose (tools and --debug taken
        # out), which LightningCLI warns about when sys.argv has arguments too
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        hf_logging.disable_progress_bar()  # "Loading weights" bars of every from_pretrained
        # Checkpoint files are written atomically and read through `load_checkpoint_file`
        # (named errors for a truncated or empty `last.ckpt` too); a recipe's own
        # `trainer.plugins` replaces this.
        defaults = {"plugins": {"class_path": "lmm.training.checkpoint.AtomicCheckpointIO"}}
        kwargs["trainer_defaults"] = {**defaults, **kwargs.get("trainer_defaults", {})}
        super().__init__(
            LMMModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=LMMArgumentParser,
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        """Check that the data and benchmark files exist before any model is built."""
        from lmm.training.recipe import check_inputs

        if self.subcommand:
            check_inputs(self.config[self.subcommand], self.subcommand)

    def instantiate_classes(self) -> None:
        """Build the recipe's objects; with `model.init_args.fsdp.meta_init`, the model's
        parameters on the meta device on every rank but 0 (`empty_init`)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        source = config and config.get("model.init_args.init_from_transformers")
        if source:  # imported with real tensors, before any meta-device build (one rank imports)
            import_transformers(source)
        with empty_init(bool(config and config.get("model.init_args.fsdp.meta_init"))):
            try:
                super().instantiate_classes()
            except ValueError as err:  # a bad init_from file: its named error, not jsonargparse's
                named = errors.user_error_in(err)
                if named is None:
                    raise
                raise named from None

    def _parse_ckpt_path(self) -> None:
        """Check `--ckpt_path` (readable, hashes intact: `load_checkpoint_file`; a sharded
        folder against its manifest: `verify_manifest`) before Lightning reads it (here, for
        hyperparameters, and again to restore), so a bad file gives lmm's named error, not
        torch's. `last`, `best` and URLs are resolved by the trainer and checked when it loads
        them (`CheckpointHashes.on_load_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        special = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
        if ckpt_path and not special and "://" not in str(ckpt_path):
            from lmm.training.checkpoint import load_checkpoint_file, verify_manifest

            if Path(ckpt_path).is_dir():  # sharded (FSDP2): no hyperparameters to read
                if _launch_rank() == 0:  # one reader; FSDP2Strategy's load shares its result
                    verify_manifest(ckpt_path)
                return
            if "hyper_parameters" not in load_checkpoint_file(ckpt_path, mmap=True):
                return  # nothing for Lightning to read here: the file is read once less
        super()._parse_ckpt_path()


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, Lightning, SLURM), before
    any process group exists; 0 in a plain run."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def synth(argv: list[str]) -> None:
    """`lmm synth`: write the synthetic shapes dataset (see `lmm synth --help`)."""
    from lmm.data.synthetic import main as synthetic_main

    synthetic_main(argv)


def tiny(argv: list[str]) -> None:
    """`lmm tiny`: write a tiny tokenizer, LLM and vision tower for the synthetic tasks."""
    from lmm.data.synthetic import corpus
    from lmm.tiny import QUICKSTART_SIZES, build_tiny_assets

    parser = argparse.ArgumentParser(prog="lmm tiny", description=tiny.__doc__)
    parser.add_argument("--out", default="assets/tiny")
    parser.add_argument("--llm-type", default="llama")
    parser.add_argument("--vision-type", default="clip", choices=["clip", "siglip"])
    # the defaults are the quickstart model's (recipes/tiny/llava_synthetic.yaml, `lmm demo`)
    for name, value in QUICKSTART_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--seed", type=int, default=0)
    options = vars(parser.parse_args(argv))  # the flags are build_tiny_assets' arguments
    out = options.pop("out")
    paths = build_tiny_assets(out, corpus(), **options)
    from lmm.tiny import build_tiny_blip2

    paths["blip2"] = build_tiny_blip2(Path(out) / "blip2", paths["llm"], paths["tokenizer"])
    log.info("tiny assets: %s", {k: str(v) for k, v in paths.items()})


def demo(argv: list[str]) -> dict:
    """`lmm demo`: synthetic data + tiny model → train on the CPU → held-out accuracy.

    Writes `OUT/metrics.json` (with `test/accuracy`), `OUT/predictions.jsonl` and
    `OUT/loss.png`, beside the run's folder (`OUT/version_N`: `checkpoints/last.ckpt`,
    `results.json`, `predictions/test.jsonl`). Unknown arguments are passed to `lmm fit`.
    """
    parser = argparse.ArgumentParser(prog="lmm demo", description=demo.__doc__)
    parser.add_argument("--recipe", default="recipes/tiny/llava_synthetic.yaml")
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--data", default="data/synthetic", help="where the synthetic data goes")
    parser.add_argument("--assets", default="assets/tiny", help="where the tiny model goes")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=500)
    a, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()
    out, data, assets = Path(a.out), Path(a.data), Path(a.assets)
    _demo_inputs(data, assets, a.train_size, a.test_size)
    args = [
        "fit",
        f"--config={a.recipe}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--data.init_args.train={data / 'train.json'}",
        f"--data.init_args.val={data / 'val.json'}",
        f"--data.init_args.test={data / 'test.json'}",
        f"--model.init_args.tokenizer={assets / 'tokenizer'}",
        f"--model.init_args.model.init_args.vision.init_args.path={assets / 'vision'}",
        f"--model.init_args.model.init_args.llm.init_args.path={assets / 'llm'}",
        *overrides,
    ]
    cli = LMMCLI(args=args)
    train_time = time.perf_counter() - start
    # from last.ckpt (the weights just trained): results.json then names the run it came from
    trainer = cli.trainer
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last", verbose=False)[0]
    metrics = {k: round(float(v), 4) for k, v in sorted(results.items())}
    metrics["train/steps"] = trainer.global_step
    metrics["train_time_s"] = round(train_time, 1)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for row in cli.model.predictions:
            f.write(json.dumps(row) + "\n")
    _plot_loss(Path(trainer.logger.log_dir) / "metrics.csv", out / "loss.png")
    log.info(
        "held-out accuracy %.3f; metrics in %s", metrics["test/accuracy"], out / "metrics.json"
    )
    return metrics


def _demo_inputs(data: Path, assets: Path, train_size: int, test_size: int) -> None:
    """Generate the synthetic data and the tiny model unless they are there already."""
    from lmm.data.synthetic import corpus, generate
    from lmm.tiny import QUICKSTART_SIZES, build_tiny_assets

    if not (data / "meta.json").is_file():
        generate(data, train=train_size, val=200, test=test_size, image_size=32, seed=0)
    if not (assets / "llm" / "config.json").is_file():
        build_tiny_assets(
            assets,
            corpus(),
            **QUICKSTART_SIZES,
        )


def _plot_loss(csv_file: Path, png: Path) -> None:
    """Training and validation loss against step, from the CSV logger's file."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
    with csv_file.open() as f:
        for row in csv.DictReader(f):
            for key, points in curves.items():
                if row.get(key):
                    points.append((int(row["step"]), float(row[key])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in curves.items():
        if points:
            ax.plot(
                *zip(*points, strict=True), label=key, marker="o" if key == "val/loss" else None
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("lmm quickstart: tiny LLaVA on synthetic shapes")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def data(argv: list[str]) -> dict:
    """`lmm data check DATA`: validate a data file or mixture; report lengths and padding."""
    from lmm.data.check import main as data_main
    from lmm.training.recipe import model_processor

    return data_main(argv, model_processor=model_processor)


def convert(argv: list[str]) -> Path:
    """`lmm convert import|export`: published checkpoints in, transformers folders out."""
    from lmm.convert import main as convert_main

    return convert_main(argv)


def bench(argv: list[str]) -> float:
    """`lmm bench peak`: this machine's matmul FLOP/s, the denominator of MFU."""
    from lmm.training.throughput import measure_peak_flops

    parser = argparse.ArgumentParser(prog="lmm bench", description=bench.__doc__)
    parser.add_argument("what", choices=["peak"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--size", type=int, default=2048)
    a = parser.parse_args(argv)
    import torch

    peak = measure_peak_flops(a.size, getattr(torch, a.dtype))
    sys.stdout.write(json.dumps({"peak_flops": peak, "dtype": a.dtype, "size": a.size}) + "\n")
    return peak


def chat(argv: list[str]) -> int:
    """`lmm chat MODEL`: chat in the terminal; images and videos by path, replies streamed."""
    from lmm.chat import main as chat_main

    return chat_main(argv)


def serve(argv: list[str]) -> None:
    """`lmm serve MODEL`: an OpenAI-compatible server; concurrent requests batched, same answers."""
    from lmm.serve import main as serve_main

    serve_main(argv)


def web(argv: list[str]) -> None:
    """`lmm web MODEL`: a Gradio chat demo in the browser; images or a video per turn, streamed."""
    from lmm.web import main as web_main

    web_main(argv)


def plan(argv: list[str]) -> dict:
    """`lmm plan --config RECIPE`: a recipe at full size: parameters, memory per GPU, micro-batch."""
    from lmm.plan import main as plan_main

    return plan_main(argv)


def report(argv: list[str]) -> str:
    """`lmm report RUNS...`: markdown table and chart of `lmm test` results."""
    from lmm.evaluation.report import main as report_main

    text = report_main(argv)
    sys.stdout.write(text)
    return text


def tasks(argv: list[str]) -> str:
    """`lmm tasks`: every built-in benchmark with its metric, local files and hub dataset."""
    from lmm.evaluation.runner import benchmark_table

    parser = argparse.ArgumentParser(prog="lmm tasks", description=tasks.__doc__)
    parser.add_argument("--markdown", action="store_true", help="a markdown table")
    a = parser.parse_args(argv)
    rows = benchmark_table()
    header = {"benchmark": "benchmark", "metric": "metric (headline)", "local": "local files",
              "hub": "hub dataset (path: hf:...)"}  # fmt: skip
    if a.markdown:
        lines = ["| " + " | ".join(header.values()) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r[k] for k in header) + " |" for r in rows]
    else:
        width = {k: max(len(header[k]), *(len(r[k]) for r in rows)) for k in header}
        lines = ["  ".join(f"{r[k]:<{width[k]}}" for k in header).rstrip() for r in [header, *rows]]
        lines.append(
            "Use one in a recipe: recipes/eval/<benchmark>.yaml; sources: docs/evaluation.md"
        )
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    return text


TOOLS = {
    "tasks": tasks,
    "chat": chat,
    "serve": serve,
    "web": web,
    "report": report,
    "plan": plan,
    "bench": bench,
    "synth": synth,
    "tiny": tiny,
    "demo": demo,
    "data": data,
    "convert": convert,
}


LIGHTNING = {
    "fit": "train a recipe (`lmm fit --config RECIPE`)",
    "validate": "the validation loss and benchmarks of a checkpoint",
    "test": "answer and score a recipe's test data and benchmarks (results.json, predictions)",
    "predict": "answer a data file with a checkpoint (predictions JSONL)",
}


def usage() -> str:
    """`lmm --help`: every subcommand with one line."""
    lines = ["usage: lmm COMMAND [options]   (lmm COMMAND --help for its options)", ""]
    commands = {**LIGHTNING, **{name: _first_line(tool) for name, tool in TOOLS.items()}}
    width = max(map(len, commands))
    lines += [f"  {name:<{width}}  {text}" for name, text in commands.items()]
    lines += ["", "--debug (or LMM_DEBUG=1) shows the traceback of an error."]
    return "\n".join(lines) + "\n"


def _first_line(tool) -> str:
    doc = (tool.__doc__ or "").strip().splitlines()[0]
    return doc.split(": ", 1)[-1] if doc.startswith("`") else doc


def main(argv: list[str] | None = None) -> None:
    """The `lmm` command. Run as the command (no `argv`), a user error (`lmm.utils.errors`)
    exits with code 2 and its message, no traceback, unless --debug or LMM_DEBUG=1; called
    with `argv` from Python, it raises. A run stopped by SIGTERM exits with 143."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    command = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = errors.debug_requested(argv) or not command
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return
    try:
        if argv[0] in TOOLS:
            TOOLS[argv[0]](argv[1:])
            return
        log.info(allocator.describe())
        LMMCLI(args=argv)
    except SIGTERMException:
        # Lightning stops a run on SIGTERM with a bare SystemExit (status 0); a scheduler or a
        # `lmm fit && lmm test` chain must see that it was stopped (128 + SIGTERM)
        sys.exit(128 + signal.SIGTERM)
    except Exception as err:
        if debug or not errors.is_user_error(err):
            raise
        raise SystemExit(errors.report(err)) from None


if __name__ == "__main__":
    main()
