"""`lmm web`: a Gradio chat demo over `lmm.load(...)`'s streaming generator.

Each turn takes text with several images or a video (uploaded or dropped), the reply streams
into the page, and the sampling settings (max tokens, temperature, top-p, seed) sit under the
chat; Retry regenerates the last reply, Clear starts over. Greedy (temperature 0) replies are
the ones `LMM.generate` gives for the same messages. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmm.api import LMM, add_model_arguments, load_from_arguments
from lmm.data.media import media_kind
from lmm.utils.errors import UserError, is_user_error, user_message
from lmm.utils.logging import get_logger

log = get_logger(__name__)

Messages = list[dict[str, Any]]  # `LMM.sample`'s messages: parts with image / video paths


def user_turn(text: str, files: list[str]) -> dict[str, Any]:
    """One user message in `LMM.sample`'s form: the media first (images or videos, read from
    their content), then the text."""
    parts: list[dict[str, str]] = []
    for name in files:
        kind = media_kind(Path(name))
        parts.append({"type": kind, kind: str(name)})
    if text.strip():
        parts.append({"type": "text", "text": text.strip()})
    return {"role": "user", "content": parts}


def shown_turn(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat display's messages for one of ours: each medium as a file, then the text."""
    out: list[dict[str, Any]] = []
    for part in message["content"]:
        if part["type"] == "text":
            out.append({"role": message["role"], "content": part["text"]})
        else:
            out.append({"role": message["role"], "content": {"path": part[part["type"]]}})
    return out


class WebChat:
    """The demo's logic apart from Gradio: a reply streamed for a conversation, one at a time."""

    def __init__(self, model: LMM):
        self.model = model
        self.lock = threading.Lock()  # one generation at a time on the one model

    def reply(
        self, messages: Messages, max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Iterator[str]:
        """The assistant's reply to `messages` as it grows (each value the whole text so far)."""
        text = ""
        with self.lock:
            pieces = self.model.stream(
                messages,
                max_new_tokens=int(max_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=int(seed) if temperature > 0 else None,
            )
            for piece in pieces:
                text += piece
                yield text
        if not text:
            yield text


def build_app(model: LMM, title: str = "lmm"):
    """The Gradio Blocks app of the demo for `model` (launched by `main`)."""
    import gradio as gr

    chat = WebChat(model)

    def respond(messages: Messages, shown: list, max_tokens, temperature, top_p, seed):
        """Stream the reply to `messages` into the display: yields (display, messages)."""
        shown = [*shown, {"role": "assistant", "content": ""}]
        text = ""
        try:
            for text in chat.reply(messages, max_tokens, temperature, top_p, seed):
                shown[-1] = {"role": "assistant", "content": text}
                yield shown, messages
        except Exception as err:
            if not (isinstance(err, ValueError | FileNotFoundError) or is_user_error(err)):
                raise
            log.info("refused a turn: %s", err)
            raise gr.Error(user_message(err)) from err
        yield shown, [*messages, {"role": "assistant", "content": text}]

    def send(box: dict, messages: Messages, shown: list, *settings):
        files = [f if isinstance(f, str) else f["path"] for f in box.get("files") or []]
        if not (box.get("text") or "").strip() and not files:
            raise gr.Error("type a question or add an image or a video")
        turn = user_turn(box.get("text") or "", files)
        messages = [*messages, turn]
        shown = [*shown, *shown_turn(turn)]
        yield gr.MultimodalTextbox(value=None, interactive=False), shown, messages
        for shown_now, messages_now in respond(messages, shown, *settings):
            yield gr.MultimodalTextbox(), shown_now, messages_now
        yield gr.MultimodalTextbox(interactive=True), shown_now, messages_now

    def retry(messages: Messages, shown: list, *settings):
        if not messages or messages[-1]["role"] != "assistant":
            return
        messages = messages[:-1]
        shown = shown[:-1]  # the reply is the display's last message
        yield from respond(messages, shown, *settings)

    with gr.Blocks(title=f"{title} · lmm web", analytics_enabled=False) as app:
        gr.Markdown(f"### {title}\nAsk about images or a video: add them with the clip or drop "
                    "them on the box, then press Enter.")  # fmt: skip
        display = gr.Chatbot(elem_id="chat", label="chat", height=420, render_markdown=False)
        messages = gr.State([])
        box = gr.MultimodalTextbox(
            elem_id="question",
            file_count="multiple",
            file_types=["image", "video"],
            placeholder="Ask a question; add images or a video",
            show_label=False,
        )
        with gr.Row():
            retry_button = gr.Button("Retry", elem_id="retry")
            clear_button = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Sampling", open=False):
            settings = [
                gr.Slider(1, 1024, value=128, step=1, label="max tokens", elem_id="max-tokens"),
                gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)"),
                gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p"),
                gr.Number(value=0, precision=0, label="seed (when sampling)"),
            ]
        box.submit(send, [box, messages, display, *settings], [box, display, messages])
        retry_button.click(retry, [messages, display, *settings], [display, messages])
        clear_button.click(lambda: ([], []), None, [display, messages], queue=False)
    return app


def main(argv: list[str]) -> None:
    """`lmm web MODEL`: the Gradio chat demo (see docs/serving.md)."""
    parser = argparse.ArgumentParser(prog="lmm web", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--title", help="the page's title (default: the MODEL path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls out
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise UserError("lmm web needs gradio; Fix: pip install 'lmm[web]'") from err

    model = load_from_arguments(args)
    app = build_app(model, args.title or Path(args.model).name)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving the demo on %s: anyone who reaches it can use the model", args.host)
    log.info("lmm web: http://%s:%d", args.host, args.port)
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, show_error=True, quiet=True
    )
