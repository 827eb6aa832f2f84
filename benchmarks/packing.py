"""Packing vs padding on a LLaVA-Instruct-like length mix: real-token share and supervised tokens/s.

The length mix (documented in docs/benchmarks.md) imitates LLaVA-1.5's 665k instruction mix
scaled down ~8x for a tiny CPU model: 85% one-image conversations with 1-8 rounds whose
answers are long-tailed (lognormal words per answer, median ~12, capped at 120), and 15%
text-only conversations of 1-10 rounds. An image is 16 tokens (576 / 36).

Both runs train the same tiny LLaVA on the same samples in the same order for one pass:
padded batches of `--batch-size` samples (as the HF Trainer with a padding collator, random
order) vs rows of `--pack-tokens` packed first-fit-decreasing from a shuffle buffer. The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmm.components.connectors import MLPConnector
from lmm.components.language import CausalLM
from lmm.components.vision import HFVisionTower
from lmm.data.collate import PadCollator
from lmm.data.datamodule import ChatDataModule
from lmm.data.formats import load_samples
from lmm.data.packing import PackCollator, first_fit_decreasing
from lmm.data.synthetic import generate, vocabulary
from lmm.data.templates import Llama3
from lmm.families.llava import LlavaModel
from lmm.tiny import build_tiny_assets
from lmm.training.module import LMMModule


def make_records(n: int, images: list[str], words: list[str], seed: int) -> list[dict]:
    """LLaVA-Instruct-like conversations (see the module docstring)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, k)))

    records = []
    for i in range(n):
        with_image = rng.random() < 0.85
        rounds = rng.randint(1, 8 if with_image else 10)
        conv = []
        for r in range(rounds):
            question = text(rng.randint(4, 20))
            if with_image and r == 0:
                question = "<image>\n" + question
            answer = text(min(120, int(np_rng.lognormal(np.log(12), 0.9))))
            conv += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        rec = {"id": f"mix-{i}", "conversation": conv}
        if with_image:
            rec["images"] = [rng.choice(images)]
        records.append(rec)
    return records


def train(module: LMMModule, batches, label: str) -> dict:
    """One pass of AdamW steps; returns supervised tokens/s and the real-token share."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()
    supervised = real = slots = 0
    start = time.perf_counter()
    for batch in batches:
        loss, n = module.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        supervised += int(n)
        real += batch.num_tokens
        slots += batch.input_ids.numel()
    seconds = time.perf_counter() - start
    print(
        f"{label:>7}: {len(batches)} steps, {seconds:.1f}s, {supervised / seconds:.0f} supervised tok/s, real tokens {real / slots:.1%}"
    )
    return {
        "tokens_per_s": supervised / seconds,
        "real_share": real / slots,
        "supervised": supervised,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pack-tokens", type=int, default=1024)
    p.add_argument("--buffer", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "shapes", train=32, val=1, test=1, tasks=["colour"], seed=a.seed)
        images = [f"shapes/images/{p.name}" for p in sorted((tmp / "shapes/images").iterdir())]
        words = vocabulary()
        (tmp / "mix.json").write_text(json.dumps(make_records(a.samples, images, words, a.seed)))
        assets = build_tiny_assets(
            tmp / "tiny", [" ".join(words)] * 4, llm_hidden=64, image_size=32, patch_size=8
        )
        model = LlavaModel(
            HFVisionTower(str(assets["vision"])), CausalLM(str(assets["llm"])), MLPConnector
        )
        module = LMMModule(model=model, tokenizer=str(assets["tokenizer"]))
        dm = ChatDataModule(template=Llama3(), max_length=a.pack_tokens)
        dm.connect(module.tokenizer, module.media_spec())
        samples = load_samples(tmp / "mix.json")
        order = np.random.default_rng(a.seed).permutation(len(samples))
        feats = [dm.processor(samples[i]) for i in order]
        pad = PadCollator(module.tokenizer.pad_token_id)
        padded = [pad(feats[i : i + a.batch_size]) for i in range(0, len(feats), a.batch_size)]
        pack = PackCollator(module.tokenizer.pad_token_id, a.pack_tokens)
        packed = []
        for s in range(0, len(feats), a.buffer):
            block = feats[s : s + a.buffer]
            rows = first_fit_decreasing([len(f.input_ids) for f in block], a.pack_tokens)
            packed += [pack.collate_rows([[block[i] for i in r]]) for r in rows]
        lengths = [len(f.input_ids) for f in feats]
        print(
            f"{len(feats)} samples, tokens per sample: median {int(np.median(lengths))}, max {max(lengths)}"
        )
        state = {k: v.clone() for k, v in module.state_dict().items()}
        res_pad = train(module, padded, "padded")
        module.load_state_dict(state)
        res_pack = train(module, packed, "packed")
    assert res_pad["supervised"] == res_pack["supervised"], "both runs must train the same tokens"
    print(
        json.dumps(
            {
                "real_token_share_packed": round(res_pack["real_share"], 4),
                "real_token_share_padded": round(res_pad["real_share"], 4),
                "tokens_per_s_packed": round(res_pack["tokens_per_s"], 1),
                "tokens_per_s_padded": round(res_pad["tokens_per_s"], 1),
                "tokens_per_s_ratio": round(res_pack["tokens_per_s"] / res_pad["tokens_per_s"], 3),
                "samples": len(feats),
                "pack_tokens": a.pack_tokens,
                "batch_size": a.batch_size,
            }
        )
    )


if __name__ == "__main__":
    main()
