"""`lmm chat` through its stdin, and the Python API it shares with evaluation (`lmm.load`)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import lmm
from lmm.chat import ChatSession, parse_turn, run
from lmm.cli import main
from lmm.data.templates import Llama3
from lmm.evaluation.runner import Task
from tests.evaluation.test_runner import TINY, _model_args, write_pope


@pytest.fixture(scope="module")
def trained_run(tiny_assets, synthetic_data, tmp_path_factory) -> Path:
    """A checkpoint of `lmm fit` (2 steps of the tiny quickstart recipe) with its config.yaml."""
    out = tmp_path_factory.mktemp("run")
    main(
        [
            "fit",
            f"--config={TINY}",
            *_model_args(tiny_assets),
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--data.init_args.train={synthetic_data / 'train.json'}",
            f"--data.init_args.val={synthetic_data / 'val.json'}",
            f"--data.init_args.test={synthetic_data / 'test.json'}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--data.init_args.batch_size=4",
            # Barely trained: a 2-step model at lr 1e-3 has learnt to end every answer at once.
            "--model.init_args.optimizer.init_args.lr=1e-6",
        ]
    )
    [ckpt] = list(out.rglob("last.ckpt"))  # beside the step-2 checkpoint of the validation
    return ckpt


@pytest.fixture(scope="module")
def model(trained_run):
    return lmm.load(trained_run)


def test_load_finds_the_recipe_and_the_weights(trained_run, model):
    state = torch.load(trained_run, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.module.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert isinstance(model.template, Llama3) and not model.module.training
    with pytest.raises(FileNotFoundError, match="no recipe for checkpoint"):
        lmm.load(shutil.copy(trained_run, trained_run.parents[3] / "lone.ckpt"))


def test_load_finds_the_recipe_of_a_seed_recipe_checkpoint(trained_run, tmp_path):
    """A seed recipe writes `runs/<name>/last.ckpt` (its ModelCheckpoint's dirpath) beside its
    runs' `version_N/config.yaml`: lmm.load takes the newest run's recipe."""
    from lmm.api import find_recipe

    run = tmp_path / "mantis_stage1_siglip"
    (run / "version_0").mkdir(parents=True)
    config = trained_run.parents[1] / "config.yaml"
    shutil.copy(config, run / "version_0" / "config.yaml")
    ckpt = Path(shutil.copy(trained_run, run / "last.ckpt"))
    assert find_recipe(ckpt) == (run / "version_0" / "config.yaml").resolve()
    lmm.load(ckpt)


def test_load_a_recipe_alone(tiny_assets, synthetic_data):
    overrides = {
        "model.init_args.tokenizer": str(tiny_assets["tokenizer"]),
        "model.init_args.model.init_args.vision.init_args.path": str(tiny_assets["vision"]),
        "model.init_args.model.init_args.llm.init_args.path": str(tiny_assets["llm"]),
    }
    model = lmm.load(TINY, overrides=overrides, template="lmm.data.templates.ChatML")
    assert type(model.template).__name__ == "ChatML"
    assert model.module.model.connector.merge == 2  # the recipe's connector
    image = str(sorted((synthetic_data / "images").glob("*.png"))[0])
    answer = model.generate(
        [{"role": "user", "content": "<image>\nColour?"}], [image], max_new_tokens=4
    )
    assert isinstance(answer, str) and answer


def test_chat_two_turns_through_stdin(trained_run, model, synthetic_data, monkeypatch, capsys):
    image = sorted((synthetic_data / "images").glob("colour-*.png"))[0]
    lines = f"What colour is {image}?\nAnd its shape, in a word?\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    main(["chat", str(trained_run), "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    replies = re.findall(r"assistant> (.*?)\nuser> ", out, flags=re.S)
    assert len(replies) == 2 and all(r.strip() for r in replies), out
    # The streamed replies are the model's answers to the growing history (image kept).
    first = [{"type": "text", "text": "What colour is "}, {"type": "image", "image": str(image)}]
    first.append({"type": "text", "text": "?"})
    history = [{"role": "user", "content": first}]
    assert model.generate(history, max_new_tokens=6) == replies[0]
    history += [
        {"role": "assistant", "content": replies[0].strip()},
        {"role": "user", "content": "And its shape, in a word?"},
    ]
    assert model.generate(history, max_new_tokens=6) == replies[1]


def test_session_interleaves_images_and_videos_across_turns(model, synthetic_data, tmp_path):
    av = pytest.importorskip("av")  # noqa: F841
    from tests.data.test_video import write_video

    clip = write_video(tmp_path / "clip.mp4", n=12)
    image = sorted((synthetic_data / "images").glob("*.png"))[0]
    session = ChatSession(model, max_new_tokens=4)
    stdout = io.StringIO()
    stdin = io.StringIO(f"Look at {image} please.\nNow {clip} and {image}: same?\n/reset\n")
    assert run(session, stdin, stdout) == 2
    assert session.messages == []  # /reset
    # The same two turns, by hand: the second prompt holds 1 + 8 frames + 1 images.
    session.reset()
    list(session.send(parse_turn(f"Look at {image} please.")))
    list(session.send(parse_turn(f"Now {clip} and {image}: same?")))
    user_turns = [m for m in session.messages if m["role"] == "user"]
    kinds = [[p["type"] for p in m["content"]] for m in user_turns]
    assert kinds == [["text", "image", "text"], ["text", "video", "text", "image", "text"]]
    sample = model.sample(session.messages)
    features = model.processor.prompt(sample)
    assert features.num_views == 1 + 8 + 1  # the video's 8 sampled frames
    reply = session.messages[1]["content"]  # the first answer is part of the second prompt
    assert reply and sample.turns[1].role == "assistant" and sample.turns[1].text == reply


def test_parse_turn_reads_media_words():
    parts = parse_turn("compare a/b.png with clip.MP4, then c.jpg. Done")
    assert parts == [
        {"type": "text", "text": "compare "},
        {"type": "image", "image": "a/b.png"},
        {"type": "text", "text": " with "},
        {"type": "video", "video": "clip.MP4"},
        {"type": "text", "text": ", then "},
        {"type": "image", "image": "c.jpg"},
        {"type": "text", "text": ". Done"},
    ]
    assert parse_turn("no media.png-like words here") == [
        {"type": "text", "text": "no media.png-like words here"}
    ]


def test_media_kind_is_read_from_content_not_suffix(model, synthetic_data, tmp_path):
    pytest.importorskip("av")
    import shutil

    from tests.data.test_video import write_video

    png_as_mp4 = tmp_path / "still.mp4"
    shutil.copy(sorted((synthetic_data / "images").glob("*.png"))[0], png_as_mp4)
    mp4_as_png = write_video(tmp_path / "clip.mp4", n=12).rename(tmp_path / "clip.png")
    question = [{"role": "user", "content": "Same?"}]
    sample = model.sample(question, images=[png_as_mp4, mp4_as_png])
    features = model.processor.prompt(sample)
    assert features.media_modes[0] == "image" and features.views_per_media[0] == 1
    assert features.views_per_media[1] == 8  # the video's sampled frames
    parts = parse_turn(f"compare {png_as_mp4} and {mp4_as_png}")
    assert [p["type"] for p in parts if p["type"] != "text"] == ["image", "video"]


def test_generate_accepts_markers_parts_and_batches(model, synthetic_data):
    image = str(sorted((synthetic_data / "images").glob("*.png"))[0])
    marker = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "\nWhat colour is the shape?"},
            ],
        }
    ]
    no_marker = [{"role": "user", "content": "What colour is the shape?"}]
    one = model.generate(marker, images=[image], max_new_tokens=5)
    assert model.generate(parts, max_new_tokens=5) == one
    assert model.generate(no_marker, images=[image], max_new_tokens=5) == one  # images go first
    text_only = model.generate(no_marker, max_new_tokens=5)
    both = model.generate([marker, no_marker], images=[[image], None], max_new_tokens=5)
    assert both == [one, text_only]
    with pytest.raises(ValueError, match="2 images given but the messages hold 1 markers"):
        model.generate(marker, images=[image, image])
    with pytest.raises(ValueError, match="more <image>/<video> markers than the 0 images"):
        model.generate(marker)
    sampled = model.generate(marker, images=[image], temperature=1.0, seed=5, max_new_tokens=5)
    assert sampled == model.generate(
        marker, images=[image], temperature=1.0, seed=5, max_new_tokens=5
    )


def test_api_evaluate_matches_lmm_test(
    trained_run, model, tiny_assets, synthetic_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_pope(Path("data/eval"), synthetic_data)
    recipe = Path(__file__).resolve().parents[2] / "recipes/eval/pope.yaml"
    main(
        [
            "test",
            f"--config={TINY}",
            f"--config={recipe}",
            *_model_args(tiny_assets),
            "--trainer.precision=32",
            f"--ckpt_path={trained_run}",
        ]
    )
    [results_file] = list(Path("runs/eval/pope").rglob("results.json"))
    results = json.loads(results_file.read_text())
    assert results["checkpoint"] == str(trained_run)
    task = Task("pope", "data/eval/pope/llava_pope_test.jsonl", root="data/eval/coco/val2014")
    task.max_new_tokens = 16  # as in recipes/eval/pope.yaml
    assert model.evaluate(task, batch_size=4) == pytest.approx(results["tasks"]["pope"]["metrics"])
