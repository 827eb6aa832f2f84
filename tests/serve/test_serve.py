"""`lmm serve` as a subprocess on 127.0.0.1: the `openai` client, concurrent batched requests
that get their lone answers, and bad requests refused with 4xx while the server stays up."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import sys
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.evaluation.test_chat import model, trained_run  # noqa: F401  (fixtures)
from tests.helpers import running_server

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
NAME = "tiny-quickstart"
MAX_TOKENS = 12
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (140, 40, 160)]


def png(colour, size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(raw: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(raw)}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, log: Path, allowed: Path, outside: Path):
        self.url, self.log, self.allowed, self.outside = url, log, allowed, outside

    def batch_sizes(self) -> list[int]:
        return [int(n) for n in re.findall(r"batch of (\d+)", self.log.read_text())]


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):  # noqa: F811
    """One `lmm serve` subprocess for the module: API key, local files under one folder."""
    root = tmp_path_factory.mktemp("serve")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "red.png").write_bytes(png(COLOURS[0]))
    (outside / "secret.png").write_bytes(png(COLOURS[1]))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    port = free_port()
    log = root / "server.log"
    command = [
        sys.executable, "-m", "lmm.cli", "serve", str(trained_run), "--name", NAME,
        "--port", str(port), "--api-key", KEY, "--allow-local-files", str(allowed),
        "--max-images", "3", "--max-image-pixels", "4096", "--max-tokens", "64",
        "--max-body-mb", "0.25", "--batch-wait-ms", "20",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{port}"
    with running_server(command, env, log, f"{url}/health", "lmm serve"):
        yield Server(url, log, allowed, outside)


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client(server, model, tmp_path):  # noqa: F811
    openai = client(server)
    assert [m.id for m in openai.models.list().data] == [NAME]
    images = [png(COLOURS[2]), png(COLOURS[3], (24, 40))]
    content = [
        {"type": "text", "text": "What colour is the first shape?"},
        image_part(images[0]),
        {"type": "text", "text": "And this one?"},
        image_part(images[1]),
    ]
    messages = [{"role": "user", "content": content}]
    reply = openai.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 32  # the text and both images' tokens
    assert 0 < reply.usage.completion_tokens <= MAX_TOKENS

    # the answer `lmm.load(...).generate` gives in this process, images by path
    paths = []
    for k, raw in enumerate(images):
        paths.append(tmp_path / f"{k}.png")
        paths[-1].write_bytes(raw)
    local = [
        {"type": "text", "text": "What colour is the first shape?"},
        {"type": "image", "image": str(paths[0])},
        {"type": "text", "text": "And this one?"},
        {"type": "image", "image": str(paths[1])},
    ]
    assert text == model.generate([{"role": "user", "content": local}], max_new_tokens=MAX_TOKENS)

    chunks = openai.chat.completions.create(
        model=NAME, messages=messages, max_tokens=MAX_TOKENS, stream=True
    )
    pieces, finish = [], None
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) >= 2  # streamed, not one piece
    assert "".join(pieces) == text and finish == reply.choices[0].finish_reason


def test_concurrent_requests_batch_invariant(server):
    openai = client(server)
    requests = []
    for k in range(16):
        content = [
            {"type": "text", "text": f"Question {k}: which shape is {'big ' * (k % 4)}here?"}
        ]
        content += [image_part(png(COLOURS[(k + j) % 5], (16 + 8 * j, 32))) for j in range(k % 4)]
        requests.append([{"role": "user", "content": content}])

    def ask(messages) -> str:
        reply = openai.chat.completions.create(
            model=NAME, messages=messages, max_tokens=MAX_TOKENS - len(messages[0]["content"])
        )
        return reply.choices[0].message.content

    before = len(server.batch_sizes())
    alone = [ask(m) for m in requests]
    assert server.batch_sizes()[before:] == [1] * 16
    assert len(set(alone)) > 1  # the prompts get different answers: the comparison means something

    together: list[str | None] = [None] * 16
    start = threading.Barrier(16)

    def run(k: int) -> None:
        start.wait()
        together[k] = ask(requests[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    sizes = server.batch_sizes()[before + 16 :]
    assert sum(sizes) == 16 and max(sizes) > 1, sizes
    assert together == alone


def test_server_bad_requests(server, model, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from lmm.serve import create_app

    headers = {"Authorization": f"Bearer {KEY}"}
    text = {"type": "text", "text": "What is it?"}

    def body(*parts, **extra) -> dict:
        return {"model": NAME, "messages": [{"role": "user", "content": [*parts]}], **extra}

    def path_part(path: str) -> dict:
        return {"type": "image_url", "image_url": {"url": path}}

    big = png(COLOURS[0], (80, 80))  # 6400 pixels > --max-image-pixels 4096
    cases = {
        "bad JSON": (400, b'{"model": "x", "messages": [', headers),
        "not an object": (400, b"[1, 2]", headers),
        "no messages": (400, {"model": NAME}, headers),
        "unknown model": (404, {**body(text), "model": "gpt-4o"}, headers),
        "too many images": (400, body(text, *[image_part(png(c)) for c in COLOURS[:4]]), headers),
        "oversized image": (400, body(text, image_part(big)), headers),
        "bad data URI": (400, body(text, path_part("data:image/png,notbase64")), headers),
        "bad base64": (400, body(text, path_part("data:image/png;base64,@@@")), headers),
        "non-image bytes": (400, body(text, image_part(b"just some text, no picture")), headers),
        "a video, not an image": (400, body(text, image_part(b"\0\0\0\x18ftypmp42" + b"\0" * 64)), headers),
        "remote URL": (400, body(text, path_part("https://example.com/cat.png")), headers),
        "path escaping the folder": (403, body(text, path_part("../outside/secret.png")), headers),
        "absolute path outside": (403, body(text, path_part(str(server.outside / "secret.png"))), headers),
        "symlink out of the folder": (403, body(text, path_part("file://link.png")), headers),
        "missing file in the folder": (400, body(text, path_part("nothing.png")), headers),
        "max_tokens over the limit": (400, body(text, max_tokens=65), headers),
        "max_tokens not a number": (400, body(text, max_tokens="ten"), headers),
        "temperature out of range": (400, body(text, temperature=9), headers),
        "bad part": (400, body({"type": "audio", "audio": "x"}), headers),
        "body too large": (413, body({"type": "text", "text": "x" * 300_000}), headers),
        "wrong API key": (401, body(text), {"Authorization": "Bearer nope"}),
        "no API key": (401, body(text), {}),
    }  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for kind, (status, payload, auth) in cases.items():
            content = payload if isinstance(payload, bytes) else None
            json_body = None if content is not None else payload
            reply = http.post("/v1/chat/completions", content=content, json=json_body, headers=auth)
            assert reply.status_code == status, (kind, reply.status_code, reply.text)
            error = reply.json()["error"]
            assert error["message"] and error["code"], (kind, error)
            assert http.get("/health").json()["status"] == "ok", kind
        assert http.get("/v1/models").status_code == 401
        # the control: the allowed folder's own file is answered
        ok = http.post(
            "/v1/chat/completions",
            json=body(text, path_part("red.png"), max_tokens=4),
            headers=headers,
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] is not None

    # without --allow-local-files no path is read (in-process: the app refuses before decoding)
    (tmp_path / "red.png").write_bytes(png(COLOURS[0]))
    with TestClient(create_app(model, NAME)) as http:
        reply = http.post(
            "/v1/chat/completions", json=body(text, path_part(str(tmp_path / "red.png")))
        )
        assert reply.status_code == 403 and "data: URI" in reply.json()["error"]["message"]
        assert http.get("/health").status_code == 200
