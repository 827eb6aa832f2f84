"""Batched generation (bs 16) vs a batch-1 loop on the same prompts: samples/s and identical outputs.

Models (untrained, so answers run to `--max-new-tokens`):
- `tiny` (default): the tests' tiny LLaVA, CLIP 32 px / patch 8 (16 tokens per image), MLP
  connector, 2-layer Llama with hidden 64;
- `quickstart`: the quickstart's, CLIP patch 4 with a 2x2-merging connector (16 tokens per
  image), 4-layer Llama with hidden 128. On a CPU its prefill is compute-bound, which caps what
  batching can gain (docs/evaluation.md).
The prompts are synthetic-shapes test questions with 1-3 images each (44-92 tokens). Both runs
call `LMMModule.generate` (greedy, batch-invariant kernels); the loop gives it one prompt at a
time. Each timing is the best of `--repeats` after a warm-up. The last line is one JSON object
with `speedup` and `identical`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.data.collate import PadCollator
from lmm.data.datamodule import ChatDataModule
from lmm.data.synthetic import corpus, generate
from lmm.data.templates import Llama3
from lmm.families.llava import LlavaModel
from lmm.tiny import build_tiny_assets
from lmm.training.module import LMMModule

SIZES = {
    "tiny": dict(patch_size=8, llm_hidden=64, llm_layers=2, merge=1),
    "quickstart": dict(patch_size=4, llm_hidden=128, llm_layers=4, merge=2),
}


def build(root: Path, prompts: int, seed: int, size: str = "tiny"):
    """The tiny model and the features of `prompts` synthetic test prompts."""
    sizes = dict(SIZES[size])
    merge = sizes.pop("merge")
    assets = build_tiny_assets(
        root / "tiny",
        corpus(),
        image_size=32,
        vision_hidden=64,
        vision_layers=2,
        seed=seed,
        **sizes,
    )
    generate(root / "data", train=1, val=1, test=prompts, image_size=32, seed=seed)
    torch.manual_seed(seed)
    model = LlavaModel(
        vision=HFVisionTower(str(assets["vision"]), feature_layer=-1),
        llm=CausalLM(str(assets["llm"])),
        connector=lambda d_in, d_out: MLPConnector(d_in, d_out, depth=2, merge=merge),
    )
    module = LMMModule(model=model, tokenizer=str(assets["tokenizer"])).eval()
    data = ChatDataModule(Llama3(), test=str(root / "data" / "test.json"))
    data.connect(module.tokenizer, module.media_spec(), module.image_token)
    module.template = data.template
    features = [data.processor.prompt(s) for s in data.load("test")]
    return module, features


def run(
    module, features, batch_size: int, max_new_tokens: int, exact: bool = True
) -> tuple[list[str], float]:
    """Answers of every prompt in batches of `batch_size`, and the wall time."""
    collate = PadCollator(module.tokenizer.pad_token_id, "left")
    answers: list[str] = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = collate(features[i : i + batch_size])
            answers += module.generate(batch, max_new_tokens, batch_invariant=exact)
    return answers, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tiny tensors gain nothing)"
    )
    parser.add_argument(
        "--kernels",
        choices=["exact", "model"],
        default="exact",
        help="exact: batch-invariant kernels (the default of generate); model: the model's own",
    )
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        module, features = build(Path(tmp), a.prompts, a.seed, a.model)
        exact = a.kernels == "exact"
        run(module, features[: a.batch_size], a.batch_size, a.max_new_tokens, exact)  # warm-up
        run(module, features[:2], 1, a.max_new_tokens, exact)
        batched, loop = [], []
        for _ in range(a.repeats):
            answers_b, t_b = run(module, features, a.batch_size, a.max_new_tokens, exact)
            answers_1, t_1 = run(module, features, 1, a.max_new_tokens, exact)
            batched.append(t_b)
            loop.append(t_1)
    n = len(features)
    tokens = [len(module.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in answers_b]
    result = {
        "model": a.model,
        "kernels": a.kernels,
        "prompts": n,
        "images_per_prompt": sorted({f.num_views for f in features}),
        "prompt_tokens": [
            min(len(f.input_ids) for f in features),
            max(len(f.input_ids) for f in features),
        ],
        "batch_size": a.batch_size,
        "max_new_tokens": a.max_new_tokens,
        "mean_answer_tokens": round(sum(tokens) / n, 1),
        "threads": a.threads,
        "samples_per_s_batched": round(n / min(batched), 2),
        "samples_per_s_loop": round(n / min(loop), 2),
        "speedup": round(min(loop) / min(batched), 2),
        "identical": answers_b == answers_1,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
