"""The video and scoring quickstart tasks: held-out video accuracy vs chance, Spearman vs step 0.

Writes a tiny model (the demo's sizes: CLIP 32 px / patch 4, 4-layer Llama 128 wide, with a
tokenizer trained on every synthetic task's text) and the `motion` and `score` datasets of
`lmm.data.synthetic`, then trains from scratch on the CPU:

- `recipes/tiny/video_synthetic.yaml` on `motion` clips, then answers the held-out clips by
  greedy generation: exact-match accuracy against chance (the most frequent test answer);
- `recipes/tiny/score_synthetic.yaml` (a regression head on the last token) on `score`
  records: Spearman ρ per label on the held-out records, trained against the same model at
  step 0 (untrained), both through lmm's validation loop (`val/score/spearman`).

`--quick` is a smoke run (tiny data, a few steps). Unknown arguments are passed to both
trainings as `lmm fit` overrides. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lmm.cli import LMMCLI  # noqa: E402
from lmm.data.datamodule import ChatDataModule  # noqa: E402
from lmm.data.synthetic import ALL_TASKS, SCORE_LABELS, corpus, generate  # noqa: E402
from lmm.data.templates import Llama3  # noqa: E402
from lmm.tiny import QUICKSTART_SIZES, build_tiny_assets  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


def overrides(
    root: Path, assets: Path, data: Path, name: str, steps: int, extra: list[str]
) -> list[str]:
    """Arguments that point a tiny recipe at this run's model, data and folders."""
    out = root / "runs" / name
    return [
        f"--config={RECIPES / f'{name}.yaml'}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={max(1, steps // 3)}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.tokenizer={assets / 'tokenizer'}",
        f"--model.init_args.model.init_args.vision.init_args.path={assets / 'vision'}",
        f"--model.init_args.model.init_args.llm.init_args.path={assets / 'llm'}",
        f"--data.init_args.train={data / 'train.json'}",
        f"--data.init_args.val={data / 'val.json'}",
        *extra,
    ]


def eval_trainer(root: Path) -> L.Trainer:
    """A quiet CPU trainer that runs over every held-out batch."""
    return L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def video_task(root: Path, assets: Path, data: Path, steps: int, extra: list[str]) -> dict:
    """Train on motion clips; exact-match accuracy on the test clips, and chance."""
    start = time.perf_counter()
    args = ["fit", *overrides(root, assets, data, "video_synthetic", steps, extra)]
    args.append(f"--data.init_args.test={data / 'test.json'}")
    cli = LMMCLI(args=args)
    train_s = time.perf_counter() - start
    results = eval_trainer(root).test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    answers = [
        r["conversation"][1]["content"] for r in json.loads((data / "test.json").read_text())
    ]
    return {
        "video_accuracy": round(float(results["test/accuracy"]), 4),
        "video_chance": round(Counter(answers).most_common(1)[0][1] / len(answers), 4),
        "video_steps": cli.trainer.global_step,
        "video_train_s": round(train_s, 1),
    }


def score_task(root: Path, assets: Path, data: Path, steps: int, extra: list[str]) -> dict:
    """Held-out Spearman of the score head untrained (step 0) and after training."""
    cli = LMMCLI(args=overrides(root, assets, data, "score_synthetic", steps, extra), run=False)
    held_out = ChatDataModule(
        template=Llama3(),
        val=str(data / "test.json"),
        eval_batch_size=64,
        max_length=256,
        labels=list(SCORE_LABELS),
    )

    def spearman() -> dict[str, float]:
        [metrics] = eval_trainer(root).validate(cli.model, datamodule=held_out, verbose=False)
        keys = ["val/score/spearman"] + [f"val/score/spearman/{n}" for n in SCORE_LABELS]
        return {k.removeprefix("val/score/"): round(float(metrics[k]), 4) for k in keys}

    untrained = spearman()
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_s = time.perf_counter() - start
    trained = spearman()
    out = {"score_spearman": trained["spearman"], "score_spearman_untrained": untrained["spearman"]}
    for name in SCORE_LABELS:
        out[f"score_spearman_{name}"] = trained[f"spearman/{name}"]
        out[f"score_spearman_{name}_untrained"] = untrained[f"spearman/{name}"]
    out.update(score_steps=cli.trainer.global_step, score_train_s=round(train_s, 1))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--train", type=int, default=4000, help="training samples per task")
    parser.add_argument("--test", type=int, default=400, help="held-out samples per task")
    parser.add_argument("--video-steps", type=int, default=600, help="as the video recipe")
    parser.add_argument("--score-steps", type=int, default=800, help="as the score recipe")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 4 steps")
    args, extra = parser.parse_known_args(argv)
    if args.quick:
        args.train, args.test, args.video_steps, args.score_steps = 64, 32, 4, 4
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        start = time.perf_counter()
        assets = root / "assets"
        build_tiny_assets(
            assets,
            corpus(ALL_TASKS),
            **QUICKSTART_SIZES,
        )
        sizes = dict(train=args.train, val=min(200, args.test), test=args.test, seed=0)
        generate(root / "data" / "video", tasks=["motion"], **sizes)
        generate(root / "data" / "score", tasks=["score"], **sizes)
        result = {
            **video_task(root, assets, root / "data" / "video", args.video_steps, extra),
            **score_task(root, assets, root / "data" / "score", args.score_steps, extra),
            "train_samples": args.train,
            "test_samples": args.test,
            "quick": args.quick,
            "threads": args.threads,
            "wall_s": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
