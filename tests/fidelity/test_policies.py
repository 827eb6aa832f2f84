"""The preprocessing policies on their own: markers, truncation, hidden tokens, tokenization."""

from __future__ import annotations

import pytest

from lmm.data.collate import PadCollator
from lmm.data.formats import parse_record
from lmm.data.media import ImageTransform
from lmm.data.packing import PackCollator
from lmm.data.policy import Preprocessing
from lmm.data.processor import Processor
from lmm.data.sample import BadRecordError
from lmm.data.templates import Phi, Plain
from lmm.data.tokenization import SentencePieceText, load_tokenizer
from tests.fidelity.seeds import FIXTURES, FlatSpec, tokenizer_folder


def _record(text: str, image="images/a.png", answer="Yes.") -> dict:
    record = {
        "id": "r",
        "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}],
    }
    if image:
        record["image"] = image
    return record


def _conversation(*values: str, image="images/a.png") -> dict:
    """A record whose turns alternate human, gpt, human, ... with these texts."""
    turns = [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]
    return {"id": "r", "image": image, "conversations": turns}


def _parse(record, **policy):
    return parse_record(record, source=FIXTURES / "records.json", policy=Preprocessing(**policy))


@pytest.mark.parametrize(
    ("placement", "text", "expected"),
    [
        ("keep", "Look at <image> now.", "Look at <image> now."),
        ("turn_start", "Look at <image> now.", "<image>\nLook at  now."),
        ("turn_start", "<image>\n\n  What?", "<image>\nWhat?"),  # LLaVA-1.5 rewrites it anyway
        ("turn_start_unless_first", "<image>\n\n  What?", "<image>\n\n  What?"),
        ("turn_start_unless_first", "Look at <image> now.", "<image>\nLook at  now."),
    ],
)
def test_marker_placement(placement, text, expected):
    assert _parse(_record(text), marker_placement=placement).turns[0].text == expected


def test_unmarked_media_policies():
    two = _record("Same?", image=["images/a.png", "images/b.png"])
    assert _parse(two).turns[0].text == "<image>\n<image>\nSame?"
    assert _parse(two, unmarked_media="prepend").turns[0].text == "<image><image>Same?"
    dropped = _parse(two, unmarked_media="drop")
    assert dropped.images == [] and dropped.turns[0].text == "Same?"
    with pytest.raises(BadRecordError, match="no <image> marker"):
        _parse(two, unmarked_media="refuse")
    with pytest.raises(BadRecordError, match="max_images=1"):
        _parse(two, max_images=1)
    with pytest.raises(BadRecordError, match="min_images=1"):
        _parse(_record("Hi", image=None), min_images=1)


def test_mantis_prepends_missing_markers_and_drops_extra_ones():
    three = _record("Look: <image>", image=["images/a.png", "images/b.png", "images/c.png"])
    sample = _parse(three, unmarked_media="prepend")
    assert sample.turns[0].text == "<image><image>Look: <image>"
    assert [p.index for p in sample.turns[0].parts if not isinstance(p, str)] == [0, 1, 2]
    one = _record("<image> and <image> and <image>", image=["images/a.png"])
    assert _parse(one, unmarked_media="prepend").turns[0].text == "<image> and  and "
    with pytest.raises(BadRecordError, match="3 <image> markers but 1 images"):
        _parse(one)


def test_leading_assistant_turn():
    record = _record("<image>\nHi")
    record["conversations"].insert(0, {"from": "gpt", "value": "Hello!"})
    assert [t.role for t in _parse(record, leading_assistant="drop").turns] == ["user", "assistant"]
    assert _parse(record).turns[0].role == "assistant"  # lmm's template refuses it later


def test_system_turn_policies():
    record = _record("<image>\nHi")
    record["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    assert _parse(record).turns[0].role == "system"
    assert [t.role for t in _parse(record, system_turn="drop").turns] == ["user", "assistant"]
    with pytest.raises(BadRecordError, match="system turn"):
        _parse(record, system_turn="refuse")


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    return load_tokenizer(str(tokenizer_folder("phi2_standin", tmp_path_factory.mktemp("tok"))))


def _processor(tokenizer, max_length=64, tokens=4, template=None, **policy):
    media = FlatSpec(ImageTransform(16, (0.5,) * 3, (0.5,) * 3, "resize"), tokens)
    return Processor(
        tokenizer, template or Phi(), media, max_length, "<image>", Preprocessing(**policy)
    )


def test_mask_tokens_hide_terminators_and_keep_positions(phi):
    processor = _processor(phi, mask_tokens=["<|endoftext|>"])
    features = processor(_parse(_record("<image>\nHi"), mask_tokens=["<|endoftext|>"]))
    eos = phi.convert_tokens_to_ids("<|endoftext|>")
    hidden = features.input_ids == eos
    assert hidden.sum() == 1 and features.labels[hidden].tolist() == [eos]  # still trained
    assert features.attention_mask.tolist() == (~hidden).long().tolist()
    batch = PadCollator(phi.pad_token_id)(
        [features, processor(_parse(_record("<image>\nA longer question")))]
    )
    n = len(features.input_ids)
    assert batch.attention_mask[0, :n].tolist() == features.attention_mask.tolist()
    assert batch.position_ids[0, :n].tolist() == list(range(n))  # hidden tokens keep their place
    with pytest.raises(ValueError, match="pack_tokens: null"):
        PackCollator(phi.pad_token_id, 512)([features])
    two_rounds = _parse(_conversation("<image>\nQ1", "A1", "Q2"), mask_tokens=["<|endoftext|>"])
    prompt = processor.prompt(two_rounds)  # inference attends to every token
    assert (prompt.input_ids == eos).sum() == 1 and prompt.attention_mask is None


def test_drop_tokens_remove_them(phi):
    kept = _processor(phi)(_parse(_record("<image>\nHi")))
    dropped = _processor(phi, drop_tokens=["<|endoftext|>"])(_parse(_record("<image>\nHi")))
    eos = phi.convert_tokens_to_ids("<|endoftext|>")
    assert kept.input_ids.tolist() == [*dropped.input_ids.tolist(), eos]


def test_truncation_policies(phi):
    sample = _parse(_record("<image>\nSay it.", answer="an answer " * 40))
    with pytest.raises(BadRecordError, match="max_length=60"):  # one round, too long
        _processor(phi, max_length=60)(sample)
    cut = _processor(phi, max_length=60, truncation="cut_tail")(sample)
    assert len(cut.input_ids) == 60 and cut.labels[-1] != -100  # a partial answer, trained
    text_cut = _processor(phi, max_length=60, truncation="cut_tail_text")(sample)
    assert len(text_cut.input_ids) == 60 + 4 - 1  # cut before the image's 4 tokens replace 1
    inside = _parse(_record("Hi <image>"))
    with pytest.raises(BadRecordError, match="cut an image"):
        _processor(
            phi, max_length=len(phi("A chat").input_ids) + 40, tokens=64, truncation="cut_tail"
        )(inside)


def test_answer_cap(phi):
    sample = _parse(_record("<image>\nHi", answer="one two three four five six"))
    full = _processor(phi)(sample)
    capped = _processor(phi, answer_max_tokens=3)(sample)
    trained = capped.labels[capped.labels != -100]
    assert trained.tolist() == full.labels[full.labels != -100][:3].tolist()


def test_plain_rounds(phi):
    sample = _parse(_record("<image>\nCaption?", answer="a cat"))
    two = _parse(_conversation("<image>\nQ1", "A1", "Q2", "A2"))
    first = _processor(phi, template=Plain(rounds="first"))(two)
    assert phi.decode(first.labels[first.labels != -100]) == "A1\n"
    with pytest.raises(BadRecordError, match="rounds='one'"):
        _processor(phi, template=Plain(rounds="one"))(two)
    assert _processor(phi, template=Plain(rounds="one"))(sample).input_ids.numel() > 0
    with pytest.raises(BadRecordError, match="needs media"):
        _processor(phi, template=Plain(rounds="first"))(_parse(_record("Hi", image=None)))


def test_sentencepiece_matches_the_slow_tokenizer(tmp_path):
    """The sentencepiece library's pieces, where transformers 5's conversion differs."""
    tokenizer = load_tokenizer(str(tokenizer_folder("sp_mistral_v1", tmp_path)))
    slow = SentencePieceText(tokenizer, "non_legacy")
    assert slow.encode("at  and", at_start=True) == [438, 28705, 304]  # ▁at ▁ ▁and
    assert tokenizer("at  and", add_special_tokens=False).input_ids != [438, 28705, 304]
    legacy = SentencePieceText(tokenizer, "legacy")
    assert legacy.encode("The", at_start=True) == legacy.encode(" The", at_start=False)


def test_data_check_with_a_recipe_refuses_what_the_seed_refuses(tmp_path, capsys):
    """`lmm data check --recipe`: the recipe's template and preprocessing decide; MAmmoTH-VL's
    stage 1 (LLaVA-NeXT's preprocess_plain) takes 8 of the 14 records, as the seed's code does."""
    from lmm.cli import data as main

    tokenizer = tokenizer_folder("qwen25", tmp_path)
    recipe = "recipes/mammoth_vl/stage1.yaml"
    args = [str(FIXTURES / "records.json"), "--tokenizer", str(tokenizer), "--recipe", recipe]
    report = main(["check", *args, "--no-check-media"])
    assert report["total"]["bad"] == 6
    lmm_default = main(["check", str(FIXTURES / "records.json"), "--tokenizer", str(tokenizer)])
    assert lmm_default["total"]["bad"] == 0
