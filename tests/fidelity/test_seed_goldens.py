"""Every seed recipe feeds the model what the seed's own code fed it, record by record.

Each golden holds, per record, what a seed's preprocessing produced at a pinned commit (input
ids, labels, attention mask, pixel summaries) or that it refused the record. lmm's recipe for
that stage (its template and `preprocessing` options) must give the same ids, labels and
attention, the same feature count per image, and the same pixels; or refuse the record too.
Images are compared as one placeholder each plus their feature-token counts.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmm.components.anyres import Anyres
from lmm.data.formats import VideoOptions, parse_record
from lmm.data.media import ImageTransform
from lmm.data.sample import BadRecordError
from lmm.families.fuyu.model import FuyuImageTransform, FuyuMediaSpec
from lmm.families.idefics2.model import Idefics2MediaSpec
from lmm.families.llava.model import OneVisionMediaSpec
from tests.fidelity.seeds import CLIP_MEAN, CLIP_STD, FIXTURES, HALF, FlatSpec, Stage, recipe_data

IMG = "<IMG>"


def flat(size, mean, std, tokens):
    """One view per image: the recipe's `image_aspect` (and `multi_image_aspect`), `tokens` each."""

    def build(model: dict):
        multi = model.get("multi_image_aspect")
        extra = ImageTransform(size, mean, std, multi) if multi else None
        return FlatSpec(ImageTransform(size, mean, std, model["image_aspect"]), tokens, extra)

    return build


def onevision(model: dict):
    anyres = Anyres(
        8, 384, 27, "(1x1),...,(6x6)", max_tiles=4, video_stride=2, video_newline="grid"
    )
    return OneVisionMediaSpec(ImageTransform(384, HALF, HALF, "resize"), 27 * 27, anyres.layout)


def fuyu(model: dict):
    return FuyuMediaSpec(
        FuyuImageTransform(model["image_height"], model["image_width"]),
        model["patch_size"],
        image_prefix=tuple(model["image_prefix"]),
        image_suffix=tuple(model["image_suffix"]),
    )


def idefics2(model: dict):
    return Idefics2MediaSpec(
        transform=ImageTransform(980, HALF, HALF, "resize"),
        image_seq_len=64,
        do_image_splitting=False,
        shortest_edge=378,
        longest_edge=980,
        fake_token="<fake_token_around_image>",
    )


# Cheetah's `forward` takes one (instruction, answer) pair: its goldens of multi-turn records
# fold the history into the instruction, a convention of the golden's author, not Cheetah's.
CHEETAH_MULTI_TURN = ("multi_turn", "long_truncated")
CLIP = flat(336, CLIP_MEAN, CLIP_STD, 576)
SIGLIP = flat(384, HALF, HALF, 729)

STAGES = {
    s.golden + (f":{s.variant}" if s.variant else ""): s
    for s in [
        Stage("llava15_pretrain", "recipes/llava15/pretrain.yaml", "sp_mistral_v1", CLIP),
        Stage("llava15_finetune", "recipes/llava15/finetune.yaml", "sp_mistral_v1", CLIP),
        Stage(
            "mantis_stage1_siglip",
            "recipes/mantis/stage1_siglip.yaml",
            "llama3",
            flat(384, HALF, HALF, 728),
        ),
        Stage("mantis_stage1_clip", "recipes/mantis/stage1_clip.yaml", "llama3", CLIP),
        Stage(
            "mantis_stage2_siglip",
            "recipes/mantis/stage2_siglip.yaml",
            "llama3",
            flat(384, HALF, HALF, 728),
        ),
        Stage("mantis_stage2_clip", "recipes/mantis/stage2_clip.yaml", "llama3", CLIP),
        Stage(
            "mammoth_vl_stage1",
            "recipes/mammoth_vl/stage1.yaml",
            "qwen25",
            flat(384, HALF, HALF, 729),
        ),
        Stage("mammoth_vl_stage2_si", "recipes/mammoth_vl/stage2_si.yaml", "qwen25", onevision),
        Stage("mammoth_vl_stage3_ov", "recipes/mammoth_vl/stage3_ov.yaml", "qwen25", onevision),
        Stage("llava_phi_stage1", "recipes/llava_phi/stage1.yaml", "phi2_standin", CLIP),
        Stage("llava_phi_stage2", "recipes/llava_phi/stage2.yaml", "phi2_standin", CLIP),
        Stage("mipha_phi_stage1", "recipes/mipha/3b_stage1.yaml", "phi2_standin", SIGLIP),
        Stage("mipha_phi_stage2", "recipes/mipha/3b_stage2.yaml", "phi2_standin", SIGLIP),
        Stage("mipha_gemma_stage1", "recipes/mipha/2.4b_stage1.yaml", "gemma_standin", SIGLIP),
        Stage(
            "mipha_gemma_stage2",
            "recipes/mipha/2.4b_stage2.yaml",
            "gemma_standin",
            SIGLIP,
            variant="variant_version_gemma",
        ),
        Stage(
            "mantis_idefics2",
            "recipes/mantis/idefics2_qlora.yaml",
            "idefics2",
            idefics2,
            ignore_index=32001,
            expanded=True,
        ),
        Stage(
            "mantis_fuyu",
            "recipes/mantis/fuyu.yaml",
            "fuyu_standin",
            fuyu,
            expanded=True,
        ),
        Stage(
            "mantis_videoscore",
            "recipes/mantis/videoscore.yaml",
            "idefics2",
            idefics2,
            records="classification.json",
            ignore_index=32001,
            expanded=True,
        ),
        Stage(
            "cheetah_vicuna",
            "recipes/cheetah/vicuna.yaml",
            "sp_mistral_v1",
            flat(224, CLIP_MEAN, CLIP_STD, 32),
            not_seed=CHEETAH_MULTI_TURN,
        ),
        Stage(
            "cheetah_llama2",
            "recipes/cheetah/llama2.yaml",
            "sp_mistral_v1",
            flat(224, CLIP_MEAN, CLIP_STD, 32),
            variant="prompt_template_real_newlines",
            not_seed=CHEETAH_MULTI_TURN,
        ),
    ]
}
RECORDS = {
    r["id"]: r
    for name in ("records.json", "classification.json")
    for r in json.loads((FIXTURES / name).read_text())
}


def _int(value) -> int:
    return int(value)


def _golden_records(stage: Stage) -> tuple[dict, dict]:
    golden = stage.load_golden()
    records = golden["records"]
    if stage.variant:
        variant = golden.get("variants", golden)[stage.variant]
        records = variant.get("records", variant)
    return golden, records


def _collapse(ids, labels, attention, image_id, ignore, weights=None):
    """Ids with each run of image tokens as one `IMG`, and the runs' feature counts."""
    out, out_labels, out_attention, runs = [], [], [], []
    k = 0
    prev_image = False
    for i, lab, att in zip(ids, labels, attention, strict=True):
        if i == image_id:
            n = weights[k] if weights is not None else 1
            k += 1
            if prev_image:
                runs[-1] += n
            else:
                out.append(IMG)
                out_labels.append(-100)
                out_attention.append(att)
                runs.append(n)
            prev_image = True
            continue
        prev_image = False
        out.append(i)
        out_labels.append(-100 if lab == ignore else lab)
        out_attention.append(att)
    return out, out_labels, out_attention, runs


def _trains_nothing(expected: dict, ignore: int) -> bool:
    """A golden record whose every label is ignored: the seed feeds it, but it trains nothing
    (Mantis-Fuyu's truncation can leave that), so refusing it is equivalent."""
    labels = expected.get("fed", expected).get("labels")
    return labels is not None and all(label == ignore for label in labels)


def _grid8(views: torch.Tensor) -> list:
    return F.adaptive_avg_pool2d(views.double(), 8).tolist()


def _lmm(stage: Stage, processor, record: dict):
    """lmm's features of a record, after checking that `length` (what packing and batching by
    length use) counts exactly the tokens they hold."""
    data = recipe_data(stage.recipe)
    video = VideoOptions(max_frames=data.get("max_frames", 8), fps=data.get("fps"))
    policy = processor.policy  # the recipe's, as the data module hands it to the reader
    sample = parse_record(record, source=FIXTURES / stage.records, policy=policy, video=video)
    features = processor(sample)
    assert processor.length(sample) == len(features.input_ids), f"{record['id']}: length"
    return features


@pytest.fixture(scope="module")
def tok_base(tmp_path_factory):
    return tmp_path_factory.mktemp("seed_tokenizers")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_seed_goldens(name, tok_base):
    """lmm's recipe gives each golden record's ids, labels, attention, features and pixels."""
    stage = STAGES[name]
    golden, records = _golden_records(stage)
    processor = stage.processor(tok_base)
    image_id = _int(golden["image_token_id"])
    ignore = stage.ignore_index
    failures = []
    extra = golden.get("video_record")
    extra = extra.get("record", extra) if isinstance(extra, dict) else None
    own = {extra["id"]: extra} if extra else {}
    for rid, expected in records.items():
        if rid in stage.not_seed:
            continue
        record = own.get(rid) or RECORDS[rid]
        if "rejected" not in expected and _trains_nothing(expected, ignore):
            try:  # lmm refuses it (truncation: refuse) or feeds the same
                _lmm(stage, processor, record)
            except BadRecordError:
                continue
        if "rejected" in expected:
            try:
                _lmm(stage, processor, record)
            except BadRecordError:
                continue
            failures.append(f"{rid}: the seed refuses it ({expected['rejected'][:80]}), lmm not")
            continue
        try:
            features = _lmm(stage, processor, record)
        except BadRecordError as err:
            failures.append(f"{rid}: lmm refuses it ({err}), the seed feeds it")
            continue
        fed = expected.get("fed", expected)
        counts = fed.get("image_tokens_kept") or expected.get("image_features_per_image")
        if stage.expanded:  # the golden's ids hold every feature token already
            counts = None
        elif counts is None:
            counts = [_int(golden["image_feature_tokens"])] * sum(
                i == image_id for i in fed["input_ids"]
            )
        attention = expected["attention_mask"] if "fed" not in expected else None
        attention = attention or [1] * len(fed["input_ids"])
        labels = fed.get("labels") or [ignore] * len(fed["input_ids"])  # scored: no labels
        want = _collapse(fed["input_ids"], labels, attention, image_id, ignore, counts)
        ids = features.input_ids.tolist()
        lmm_attention = (
            features.attention_mask.tolist()
            if getattr(features, "attention_mask", None) is not None
            else [1] * len(ids)
        )
        got = _collapse(
            ids, features.labels.tolist(), lmm_attention, processor.image_token_id, -100
        )
        names = ("input_ids", "labels", "attention", "features")
        for what, a, b in zip(names, got, want, strict=True):
            if a != b:
                at = next(
                    (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)),
                )
                failures.append(
                    f"{rid}: {what} differ at {at} (lengths {len(a)} vs {len(b)}): "
                    f"lmm {a[max(0, at - 3) : at + 4]} seed {b[max(0, at - 3) : at + 4]}"
                )
                break
        else:
            if "target" in expected and features.target.tolist() != expected["target"]:
                failures.append(f"{rid}: target {features.target.tolist()} vs {expected['target']}")
            views = expected.get("pixels") or []
            if features.pixel_values is not None:
                lmm_grids = _grid8(features.pixel_values)
                for v, grid in enumerate(lmm_grids):
                    h, w = views[v]["shape"][-2:]
                    if tuple(features.pixel_values.shape[-2:]) != (h, w):  # padded further
                        grid = _grid8(features.pixel_values[v : v + 1, :, :h, :w])[0]
                    seed = torch.tensor(views[v]["grid8"], dtype=torch.float64)
                    if not torch.allclose(torch.tensor(grid, dtype=torch.float64), seed, atol=2e-4):
                        diff = (torch.tensor(grid, dtype=torch.float64) - seed).abs().max().item()
                        failures.append(f"{rid}: pixels of view {v} differ by {diff:.4f}")
                        break
    assert not failures, f"{name}: {len(failures)} records differ:\n" + "\n".join(failures)
