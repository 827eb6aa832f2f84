"""Score heads (VideoScore): losses at the last non-pad token, padding, metrics, recipes."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForSequenceClassification

from lmm.cli import LMMCLI
from lmm.components.score_head import ScoreConfig, ScoreHead, last_token_index
from lmm.data.batch import Features
from lmm.data.collate import PadCollator
from lmm.data.datamodule import ChatDataModule
from lmm.data.packing import PackCollator
from lmm.data.sample import Media, Sample, Turn
from lmm.data.synthetic import SCORE_LABELS, generate
from lmm.data.templates import Llama3
from lmm.evaluation.tasks.videofeedback import spearman
from lmm.families.llava import LlavaModel
from lmm.training.module import LMMModule
from lmm.training.objectives import Scores
from tests.helpers import quiet_trainer, tiny_llava, tiny_llava_args

TOL = dict(rtol=1e-5, atol=1e-5)
LABELS = ["a", "b", "c"]
TARGETS = {  # two samples' targets per problem type
    "regression": [[2.5, 1.0, 3.0], [1.0, 3.5, 2.0]],
    "single_label": [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    "multi_label": [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
}
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
VIDEOSCORE = RECIPES / "mantis" / "videoscore.yaml"


def _scored_module(tiny_assets, problem="regression", labels=LABELS, seed=0) -> LMMModule:
    """A tiny LLaVA with a score head whose weights are large enough to give spread scores."""
    torch.manual_seed(seed)
    module = tiny_llava(
        tiny_assets, objective=Scores(labels=list(labels), problem=problem, bias=True)
    )
    with torch.no_grad():
        module.objective.head.proj.weight.normal_(0.0, 0.5)
        module.objective.head.proj.bias.normal_(0.0, 0.5)
    return module.eval()


def _samples(synthetic_data: Path, targets: list[list[float]]) -> list[Sample]:
    """Two scored samples of different lengths: one image and a short prompt, two and a long one."""
    images = sorted((synthetic_data / "images").glob("*.png"))
    short = Sample("s-short", [Turn("user", ["Rate:", Media(0)])], [images[0]], target=targets[0])
    long = Sample(
        "s-long",
        [Turn("user", ["Rate these two pictures, please:", Media(0), "and", Media(1)])],
        [images[1], images[2]],
        target=targets[1],
    )
    return [short, long]


def _features(module, synthetic_data: Path, targets) -> list[Features]:
    dm = ChatDataModule(template=Llama3())
    dm.connect(module.tokenizer, module.media_spec(), module.image_token)
    return [dm.processor(s) for s in _samples(synthetic_data, targets)]


def _last_hidden_alone(module, feature: Features) -> torch.Tensor:  # -> [D]
    """The LLM's final hidden state at the last token of one unpadded sample, from the decoder."""
    batch = PadCollator(module.tokenizer.pad_token_id)([feature])
    with torch.no_grad():
        embeds = module.model.embed(batch, module.image_token_id)
        decoder = module.model.llm.model.model  # LlamaModel: no lm_head, no pooling of ours
        out = decoder(inputs_embeds=embeds, position_ids=batch.position_ids)
    return out.last_hidden_state[0, -1]


@pytest.mark.parametrize("problem", ["regression", "single_label", "multi_label"])
def test_loss_equals_hand_computation_at_last_real_token(problem, tiny_assets, synthetic_data):
    module = _scored_module(tiny_assets, problem)
    targets = torch.tensor(TARGETS[problem])
    features = _features(module, synthetic_data, TARGETS[problem])
    assert len(features[0].input_ids) < len(features[1].input_ids)
    batch = PadCollator(module.tokenizer.pad_token_id, "right")(features)
    assert batch.attention_mask[0, -1] == 0  # the short row is padded on the right
    with torch.no_grad():
        loss, n = module.loss(batch)
    hidden = torch.stack([_last_hidden_alone(module, f) for f in features])  # [2, D]
    w, b = module.objective.head.proj.weight, module.objective.head.proj.bias
    scores = hidden @ w.T + b  # [2, 3]
    if problem == "regression":
        expected = ((scores - targets) ** 2).mean()
    elif problem == "single_label":
        expected = -(targets * scores.log_softmax(dim=-1)).sum(dim=-1).mean()
    else:
        p = scores.sigmoid()
        expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert int(n) == 2
    torch.testing.assert_close(loss, expected, **TOL)
    assert loss > 0.05  # the head is not trivially right


def test_scores_do_not_depend_on_batch_or_padding_side(tiny_assets, synthetic_data):
    module = _scored_module(tiny_assets)
    features = _features(module, synthetic_data, TARGETS["regression"])
    pad = module.tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat(
            [module.objective.scores(module, PadCollator(pad)([f])) for f in features]
        )
        right = module.objective.scores(module, PadCollator(pad, "right")(features))
        left = module.objective.scores(module, PadCollator(pad, "left")(features))
    assert alone.shape == (2, len(LABELS))
    torch.testing.assert_close(right, alone, **TOL)
    torch.testing.assert_close(left, alone, **TOL)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # rows really differ


def test_every_trainable_parameter_gets_a_gradient(tiny_assets, synthetic_data):
    """The untied LM head, which a score model never reads, is frozen; all else trains."""
    module = _scored_module(tiny_assets)
    head = module.model.llm.model.get_output_embeddings()
    assert head.weight is not module.model.llm.model.get_input_embeddings().weight
    assert not head.weight.requires_grad
    features = _features(module, synthetic_data, TARGETS["regression"])
    module.loss(PadCollator(module.tokenizer.pad_token_id)(features))[0].backward()
    no_grad = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_matches_transformers_sequence_classification(tiny_assets):
    """Text-only rows: our head equals transformers' `LlamaForSequenceClassification`
    (the class VideoScore's head follows) with the same weights, at 1e-5."""
    module = _scored_module(tiny_assets, labels=["x", "y"])
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_assets["llm"]), num_labels=2
    ).eval()
    hf.model.load_state_dict(module.model.llm.model.model.state_dict())
    with torch.no_grad():
        hf.score.weight.copy_(module.objective.head.proj.weight)
    module.objective.head.proj.bias.data.zero_()  # transformers' head has no bias
    dm = ChatDataModule(template=Llama3())
    dm.connect(module.tokenizer, module.media_spec(), module.image_token)
    texts = ["How many shapes are there?", "What colour is the shape? Which image shows it?"]
    samples = [Sample(f"t{i}", [Turn("user", [t])], target=[1.0, 2.0]) for i, t in enumerate(texts)]
    batch = PadCollator(module.tokenizer.pad_token_id)([dm.processor(s) for s in samples])
    assert hf.config.pad_token_id == module.tokenizer.pad_token_id
    with torch.no_grad():
        ours = module.objective.scores(module, batch)
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, theirs, **TOL)


def test_packed_rows_and_missing_targets_are_refused(tiny_assets, synthetic_data):
    module = _scored_module(tiny_assets)
    features = _features(module, synthetic_data, TARGETS["regression"])
    packed = PackCollator(module.tokenizer.pad_token_id, 512)(features)
    with pytest.raises(ValueError, match="pack_tokens: null"):
        module.loss(packed)
    batch = PadCollator(module.tokenizer.pad_token_id)(features)
    batch.targets = None
    with pytest.raises(ValueError, match="no score targets.*classification"):
        module.loss(batch)
    batch.targets = torch.zeros(2, 2)  # 2 values for a 3-label head
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*\['a', 'b', 'c'\]"):
        module.loss(batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": []}, "empty"),
        ({"labels": ["a", "a"]}, "duplicate"),
        ({"labels": ["a", "b"], "problem": "ordinal"}, "problem must be one of"),
        ({"labels": ["a"], "problem": "single_label"}, "2\\+ labels"),
    ],
)
def test_bad_score_configs_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScoreConfig(**kwargs)


def test_family_without_return_hidden_is_refused(tiny_assets):
    class OldForward(LlavaModel):
        def forward(self, batch, image_token_id, attention_mask):
            return super().forward(batch, image_token_id, attention_mask)

    model = tiny_llava(tiny_assets).model
    model.__class__ = OldForward
    with pytest.raises(TypeError, match="OldForward.forward has no `return_hidden`"):
        LMMModule(model=model, tokenizer=str(tiny_assets["tokenizer"]), objective=Scores(["a"]))


def test_every_family_forward_takes_return_hidden():
    """The contract a score head relies on (docs/families.md): every family has it."""
    from lmm.families.fuyu.model import FuyuModel
    from lmm.families.idefics2.model import Idefics2Model
    from lmm.families.qformer import QFormerModel

    for model in (LlavaModel, QFormerModel, Idefics2Model, FuyuModel):
        assert "return_hidden" in inspect.signature(model.forward).parameters, model.__name__


def test_head_is_a_part_trained_and_frozen_like_the_others(tiny_assets):
    module = tiny_llava(tiny_assets, objective=Scores(["a", "b"]), freeze=["vision"])
    assert set(module.all_parts()) == {"vision", "connector", "llm", "score"}
    assert isinstance(module.all_parts()["score"], ScoreHead)
    assert module.objective.head.proj.bias is None  # transformers' and VideoScore's head: no bias
    frozen = tiny_llava(tiny_assets, objective=Scores(["a", "b"]), freeze=["score"])
    assert not any(p.requires_grad for p in frozen.objective.head.parameters())


@pytest.fixture(scope="module")
def score_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score")
    generate(out, train=16, val=12, test=8, tasks=["score"], seed=0)
    return out


def test_train_validate_and_predict_scores(tiny_assets, score_data, tmp_path):
    torch.manual_seed(0)
    module = tiny_llava(tiny_assets, objective=Scores(list(SCORE_LABELS)))
    dm = ChatDataModule(
        template=Llama3(),
        train=str(score_data / "train.json"),
        val=str(score_data / "val.json"),
        test=str(score_data / "val.json"),
        predict=str(score_data / "val.json"),
        batch_size=4,
        labels=list(SCORE_LABELS),
    )
    before = module.objective.head.proj.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, 2, [])
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    assert not torch.equal(before, module.objective.head.proj.weight)

    evaluator = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    [metrics] = evaluator.validate(module, dm, verbose=False)
    names = ["brightness", "count"]
    expected_keys = {"val/loss", "val/score/spearman", "val/score/mse"}
    expected_keys |= {f"val/score/{m}/{n}" for m in ("spearman", "mse") for n in names}
    assert expected_keys <= set(metrics)
    # the logged values are those of the scores and targets, by an independent Spearman
    module.eval()
    batch = PadCollator(module.tokenizer.pad_token_id)([dm.processor(s) for s in dm.samples["val"]])
    with torch.no_grad():
        scores = module.objective.scores(module, batch)
    for k, name in enumerate(names):
        rho = spearman(scores[:, k], batch.targets[:, k])
        assert metrics[f"val/score/spearman/{name}"] == pytest.approx(rho, abs=1e-4)
        mse = float(((scores[:, k] - batch.targets[:, k]) ** 2).mean())
        assert metrics[f"val/score/mse/{name}"] == pytest.approx(mse, rel=1e-4)

    # test: left-padded prompts keep their targets; the same metrics as validation
    [tested] = evaluator.test(module, dm, verbose=False)
    for name in names:
        key = f"score/spearman/{name}"
        assert tested[f"test/{key}"] == pytest.approx(metrics[f"val/{key}"], abs=1e-4)

    # predict: left-padded prompts, the same scores by label
    rows = [r for out in evaluator.predict(module, dm) for r in out]
    assert [r["id"] for r in rows] == batch.ids
    predicted = torch.tensor([[r["scores"][n] for n in names] for r in rows])
    torch.testing.assert_close(predicted, scores, **TOL)


def _frames_records(out: Path, n: int, frames: int) -> Path:
    """VideoScore-like classification records: `frames` frames, the 5 dimensions in [1, 4]."""
    labels = yaml.safe_load(VIDEOSCORE.read_text())["model"]["init_args"]["objective"]["init_args"][
        "labels"
    ]
    (out / "frames").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        paths = []
        for j in range(frames):
            path = out / "frames" / f"{i}_{j}.png"
            Image.new("RGB", (32, 32), (20 * i + 8 * j, 90, 160)).save(path)
            paths.append(str(path.relative_to(out)))
        scores = {name: 1.0 + (i + k) % 4 for k, name in enumerate(labels)}
        records.append(
            {"id": f"v{i}", "images": paths, "prompt": "Rate the video:", "labels": scores}
        )
    (out / "train.json").write_text(json.dumps(records))
    return out / "train.json"


def test_videoscore_recipe_settings_train_two_steps(tiny_assets, tmp_path):
    """recipes/mantis/videoscore.yaml (head, 16-frame data, optimiser) with the tiny LLaVA swapped
    in for Mantis-Idefics2: 2 training steps on 16-frame, 5-dimension records."""
    recipe = yaml.safe_load(VIDEOSCORE.read_text())
    tiny = yaml.safe_load((RECIPES / "tiny" / "score_synthetic.yaml").read_text())
    recipe["model"]["class_path"] = tiny["model"]["class_path"]
    recipe["model"]["init_args"]["model"] = tiny["model"]["init_args"]["model"]
    recipe["model"]["init_args"].pop("fsdp")
    (tmp_path / "videoscore_tiny.yaml").write_text(yaml.safe_dump(recipe))
    train = _frames_records(tmp_path / "data", n=4, frames=16)
    cli = LMMCLI(
        args=[
            "fit",
            f"--config={tmp_path / 'videoscore_tiny.yaml'}",
            "--trainer.strategy=auto",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=1",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *tiny_llava_args(tiny_assets),
            "--model.init_args.model.init_args.connector.init_args.merge=1",
            f"--data.init_args.train={train}",
            "--data.init_args.val=null",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
        ]
    )
    assert cli.trainer.global_step == 2
    head = cli.model.objective.head
    assert head.labels[0] == "visual quality" and len(head.labels) == 5
    assert head.config.problem == "regression" and head.proj.bias is None
    [group] = [g for g in cli.trainer.optimizers[0].param_groups if g["name"] == "score"]
    assert group["initial_lr"] == 1e-5 and group["weight_decay"] == 0.01


def test_videoscore_recipe_parses(capsys):
    """The published recipe (Idefics2 family) validates against the CLI's signatures."""
    with pytest.raises(SystemExit) as exit_info:
        LMMCLI(args=["fit", f"--config={VIDEOSCORE}", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    score = printed["model"]["init_args"]["objective"]["init_args"]
    assert score["problem"] == "regression" and len(score["labels"]) == 5
    assert printed["data"]["init_args"]["labels"] == score["labels"]
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1e-5
    assert printed["data"]["init_args"]["max_frames"] == 16
    assert math.isclose(printed["model"]["init_args"]["scheduler"]["init_args"]["warmup"], 0.03)


def test_score_recipe_trains_two_steps(tiny_assets, score_data, tmp_path):
    """recipes/tiny/score_synthetic.yaml (tiny sizes swapped in) trains 2 steps and validates."""
    cli = LMMCLI(
        args=[
            "fit",
            f"--config={RECIPES / 'tiny' / 'score_synthetic.yaml'}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.precision=32-true",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *tiny_llava_args(tiny_assets),
            "--model.init_args.model.init_args.connector.init_args.merge=1",
            f"--data.init_args.train={score_data / 'train.json'}",
            f"--data.init_args.val={score_data / 'val.json'}",
            f"--data.init_args.test={score_data / 'val.json'}",
            "--data.init_args.batch_size=4",
        ]
    )
    assert cli.trainer.global_step == 2
    logged = cli.trainer.logged_metrics
    assert "val/score/spearman/brightness" in logged and "val/score/mse/count" in logged
    # lmm test of a score head: results.json holds its metrics, the predictions its scores
    [tested] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    run = Path(cli.trainer.log_dir)
    entry = json.loads((run / "results.json").read_text())["tasks"]["test"]
    assert entry["headline"] == "score/spearman" and entry["scale"] == 1.0
    assert entry["score"] == pytest.approx(float(tested["test/score/spearman"]))
    assert entry["metrics"]["score/mse/count"] == pytest.approx(
        float(tested["test/score/mse/count"])
    )
    rows = [json.loads(line) for line in (run / "predictions/test.jsonl").read_text().splitlines()]
    assert len(rows) == entry["samples"] > 0
    assert all(set(r["scores"]) == {"brightness", "count"} and "targets" in r for r in rows)
