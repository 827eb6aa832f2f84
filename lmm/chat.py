"""`lmm chat`: a terminal chat with a model; images and videos by path, replies streamed.

Each line you type is one user turn. A word that names an image or video file (by suffix:
`.png`, `.jpg`, ..., `.mp4`, ...) is that media, at that place in the text; media and text
interleave freely across turns, and the whole history goes to the model each turn in its own
chat template. Commands: `/reset` (forget the history), `/exit` (or end of input).
"""

from __future__ import annotations

import argparse
import atexit
import re
import sys
from pathlib import Path
from typing import TextIO

from lmm.api import LMM, add_model_arguments, load_from_arguments
from lmm.data.media import VIDEO_SUFFIXES, media_kind

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MEDIA_WORD = re.compile(
    r"(?<!\S)(\S+(?:" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES + VIDEO_SUFFIXES) + r"))"
    r"(?=[\s,;:!?)]|$|\.(?:\s|$))",
    re.IGNORECASE,
)
HELP = "Type a message; name images/videos by path in it. /reset clears the history, /exit quits."


def parse_turn(line: str) -> list[dict]:
    """Content parts of one typed line: text, and media for each word naming a media file."""
    parts: list[dict] = []
    last = 0
    for match in _MEDIA_WORD.finditer(line):
        text = line[last : match.start()]
        if text.strip():
            parts.append({"type": "text", "text": text})
        path = Path(match.group(1)).expanduser()
        kind = media_kind(path)
        parts.append({"type": kind, kind: str(path)})
        last = match.end()
    tail = line[last:]
    if tail.strip():
        parts.append({"type": "text", "text": tail})
    return parts


class ChatSession:
    """The history of one chat: messages (with media parts) sent whole to the model each turn."""

    def __init__(self, model: LMM, system: str | None = None, **sampling):
        """
        Args:
            model: the loaded model (`lmm.load`).
            system: a system prompt (default: the template's).
            sampling: `max_new_tokens`, `temperature`, `top_p`, `seed` for every reply.
        """
        self.model = model
        self.system = system
        self.sampling = sampling
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, parts: list[dict]):
        """Stream the reply to a user turn; the turn and the full reply join the history."""
        for part in parts:
            path = part.get(part["type"]) if part["type"] != "text" else None
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file")
        turn = {"role": "user", "content": parts}
        pieces = []
        for piece in self.model.stream([*self.messages, turn], **self.sampling):
            pieces.append(piece)
            yield piece
        self.messages += [turn, {"role": "assistant", "content": "".join(pieces).strip()}]


def run(session: ChatSession, stdin: TextIO, stdout: TextIO) -> int:
    """The read-reply loop on the given streams; returns the number of replies."""
    replies = 0
    stdout.write(HELP + "\n")
    read = _line_reader(stdin, stdout)
    while True:
        line = read()
        if not line:
            stdout.write("\n")
            return replies
        line = line.strip()
        if not stdin.isatty():  # piped input: echo it, so the transcript reads as a dialogue
            stdout.write(line + "\n")
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return replies
        if line == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        parts = parse_turn(line)
        stdout.write("assistant> ")
        try:
            for piece in session.send(parts):
                stdout.write(piece)
                stdout.flush()
        except (FileNotFoundError, ValueError) as err:
            stdout.write(f"(not sent: {err})")
        else:
            replies += 1
        stdout.write("\n")


HISTORY = Path("~/.lmm_chat_history")


def _line_reader(stdin: TextIO, stdout: TextIO):
    """A function reading one typed line ("" at the end of input). On a terminal it is
    `input()` with readline: arrow keys edit the line and walk the history (kept in
    ~/.lmm_chat_history); otherwise a plain read of `stdin` after the prompt."""
    if stdin is sys.stdin and stdin.isatty() and stdout is sys.stdout:
        try:
            import readline
        except ImportError:  # not on every platform; input() still works without editing
            readline = None
        history = HISTORY.expanduser()
        if readline is not None:
            try:
                readline.read_history_file(history)
            except OSError:
                pass
            atexit.register(_save_history, readline, history)

        def typed() -> str:
            try:
                return input("user> ") + "\n"
            except EOFError:
                return ""

        return typed

    def piped() -> str:
        stdout.write("user> ")
        stdout.flush()
        return stdin.readline()

    return piped


def _save_history(readline, path: Path) -> None:
    try:
        readline.set_history_length(1000)
        readline.write_history_file(path)
    except OSError:
        pass


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None):
    """`lmm chat MODEL`: chat with a checkpoint (+ recipe), a recipe or a `lmm convert` folder."""
    parser = argparse.ArgumentParser(prog="lmm chat", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. model.init_args.tokenizer=assets/tiny/tokenizer",
    )
    a = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in a.set)
    model = load_from_arguments(a, overrides)
    sampling = {k: getattr(a, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    session = ChatSession(model, a.system, **sampling)
    return run(session, stdin or sys.stdin, stdout or sys.stdout)
