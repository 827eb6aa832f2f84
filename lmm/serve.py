"""`lmm serve`: an OpenAI-compatible HTTP server whose batched answers do not depend on the batch.

`POST /v1/chat/completions` (OpenAI messages, `image_url` parts as `data:` URIs, `stream: true`
as server-sent events), `GET /v1/models`, `GET /health`. A scheduler thread takes the requests
that are queued, up to `--max-batch`, and decodes them together with the model's batch-invariant
generator (`lmm.generation.generator.Generator`): a request's greedy answer (and a seeded
sampled one) is the one it gets alone, bit for bit. See docs/serving.md.
"""

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import queue
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmm.api import LMM, _safe_prefix, add_model_arguments, load_from_arguments
from lmm.data.batch import Features
from lmm.data.media import ImageError, ImageTooLargeError, load_image
from lmm.generation.decode import cut_at_stop
from lmm.utils.errors import UserError, is_user_error, user_message
from lmm.utils.logging import get_logger

log = get_logger(__name__)

ROLES = ("system", "user", "assistant")
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[^;,]*)*)(;base64)?,", re.ASCII)


@dataclass
class Limits:
    """What one request may ask for; anything more is refused with a 4xx error."""

    max_body_bytes: int = 20 << 20  # the request's JSON, images included (base64)
    max_images: int = 8  # images in one request, all messages together
    max_image_pixels: int = 16_000_000  # width x height of one decoded image
    max_image_side: int = 8192  # longest side of one image, in pixels
    max_tokens: int = 1024  # `max_tokens` a request may ask for (also the default)
    max_stop: int = 4  # stop strings of one request (OpenAI's limit)
    allow_local_files: Path | None = None  # images by path / file:// under this folder only


class RequestError(UserError):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


@dataclass
class Job:
    """One request in the scheduler: its prompt, sampling, and where its events go."""

    features: Features
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    emit: Callable[[dict], None]  # thread-safe: {"delta"} / {"done", ...} / {"error"}
    tokens: list[int] = field(default_factory=list)
    shown: int = 0
    cancelled: bool = False  # the client went away: the row ends at the next step

    @property
    def prompt_tokens(self) -> int:
        return int(self.features.input_ids.shape[0])


# ------------------------------------------------------------------------------- requests


def parse_request(body: bytes, name: str, limits: Limits, workdir: Path) -> dict[str, Any]:
    """A chat-completions body checked against `limits`: messages in `LMM.sample`'s form (images
    decoded into `workdir`, their budgets checked) and the sampling values. Raises RequestError."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}", "invalid_json") from err
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object", "invalid_request")
    model = request.get("model")
    if model is not None and model != name:
        raise RequestError(
            404, f"model {model!r} is not served here; this server serves {name!r}",
            "model_not_found", "model",
        )  # fmt: skip
    if request.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported; send several requests", "invalid_n", "n")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            400, "`messages` must be a non-empty list", "invalid_messages", "messages"
        )
    images = 0
    converted = []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(
                400, f"{where} must be an object with a role in {ROLES}", "invalid_messages", where
            )
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError(
                400,
                f"{where}.content must be a string or a list of parts",
                "invalid_content",
                where,
            )
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                images += 1
                if images > limits.max_images:
                    raise RequestError(
                        400, f"more than {limits.max_images} images in one request",
                        "too_many_images", at,
                    )  # fmt: skip
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(
                        400, f"{at}: image_url.url must be a string", "invalid_image", at
                    )
                path = _image(url, limits, workdir / f"{images}.img", at)
                parts.append({"type": "image", "image": str(path)})
            else:
                raise RequestError(
                    400, f"{at}: a part is {{'type': 'text', 'text': ...}} or "
                    "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}",
                    "invalid_content", at,
                )  # fmt: skip
        converted.append({"role": message["role"], "content": parts})
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is None:
        max_tokens = limits.max_tokens
    if not _integer(max_tokens) or not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(
            400, f"max_tokens must be an integer from 1 to {limits.max_tokens}, got {max_tokens!r}",
            "invalid_max_tokens", "max_tokens",
        )  # fmt: skip
    temperature = _number(request, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(request, "top_p", 1.0, 0.0, 1.0)
    seed = request.get("seed")
    if seed is not None and not _integer(seed):
        raise RequestError(400, f"seed must be an integer, got {seed!r}", "invalid_seed", "seed")
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(
            400, "stop must be a string or a list of strings", "invalid_stop", "stop"
        )
    if len(stop) > limits.max_stop:
        raise RequestError(400, f"at most {limits.max_stop} stop strings", "invalid_stop", "stop")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", "invalid_stream", "stream")
    options = request.get("stream_options") or {}
    return {
        "messages": converted,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop,
        "stream": stream,
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
    }


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(request: dict, key: str, default: float, low: float, high: float) -> float:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(
            400,
            f"{key} must be a number from {low} to {high}, got {value!r}",
            f"invalid_{key}",
            key,
        )
    return float(value)


def _image(url: str, limits: Limits, out: Path, at: str) -> Path:
    """The file of an `image_url`: a `data:` URI written to `out`, or a file under the allowed
    folder; decoded once here so that a bad or oversized image is this request's 4xx error."""
    if url.startswith("data:"):
        match = _DATA_URI.match(url)
        if match is None or match.group(3) is None:
            raise RequestError(
                400, f"{at}: a data URI must look like data:image/png;base64,<base64 bytes>",
                "invalid_image", at,
            )  # fmt: skip
        try:
            out.write_bytes(base64.b64decode(url[match.end() :], validate=True))
        except (binascii.Error, ValueError) as err:
            raise RequestError(
                400, f"{at}: the data URI is not valid base64 ({err})", "invalid_image", at
            ) from err
        path = out
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise RequestError(
            400, f"{at}: the server does not fetch URLs ({url.split('://')[0]}://); send the image "
            "as a data: URI", "invalid_image", at,
        )  # fmt: skip
    else:
        path = _local_file(url.removeprefix("file://"), limits.allow_local_files, at)
    try:
        load_image(path, max_pixels=limits.max_image_pixels, max_side=limits.max_image_side)
    except ImageTooLargeError as err:
        message = str(err).replace(str(path), "the image").split("; resize")[0].split("; crop")[0]
        raise RequestError(
            400, f"{at}: {message} (this server's limits: {limits.max_image_pixels} pixels, sides "
            f"up to {limits.max_image_side})", "image_too_large", at,
        ) from err  # fmt: skip
    except (ImageError, OSError) as err:
        message = str(err).replace(str(path), "the image").split("; ")[0]
        raise RequestError(400, f"{at}: {message}", "invalid_image", at) from err
    return path


def _local_file(name: str, allowed: Path | None, at: str) -> Path:
    """A server-side image path, only under `allowed` (symlinks resolved)."""
    if allowed is None:
        raise RequestError(
            403, f"{at}: this server does not read its own files; send the image as a data: URI "
            "(or start it with --allow-local-files DIR)", "local_files_forbidden", at,
        )  # fmt: skip
    root = allowed.resolve()
    path = (root / name).resolve()  # an absolute `name` replaces root; `..` and links resolved
    if not path.is_relative_to(root):
        raise RequestError(
            403, f"{at}: {name} is outside the allowed folder", "path_not_allowed", at
        )
    if not path.is_file():
        raise RequestError(400, f"{at}: no file {name} in the allowed folder", "invalid_image", at)
    return path


# ------------------------------------------------------------------------------ scheduler


class Scheduler:
    """A thread that decodes the queued requests together, up to `max_batch` at a time.

    Requests with the same sampling (greedy, or one temperature and top_p) share a batch; each
    row ends at its own `max_tokens` and stop strings, so its answer is the one it gets alone.
    """

    def __init__(self, model: LMM, max_batch: int = 16, wait: float = 0.005):
        """
        Args:
            model: the loaded model.
            max_batch: most requests decoded together.
            wait: seconds to wait for more requests after the first one of a batch arrived.
        """
        self.model = model
        self.max_batch = max_batch
        self.wait = wait
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lmm-serve-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
            groups: dict[tuple[float, float], list[Job]] = {}
            for job in jobs:
                key = (job.temperature, job.top_p) if job.temperature > 0 else (0.0, 1.0)
                groups.setdefault(key, []).append(job)
            for (temperature, top_p), group in groups.items():
                try:
                    self.decode(group, temperature, top_p)
                except Exception as err:  # one failing batch must not stop the server
                    log.exception("a batch of %d failed", len(group))
                    for job in group:
                        job.emit({"error": f"generation failed: {err}"})

    def decode(self, jobs: list[Job], temperature: float, top_p: float) -> None:
        """Decode `jobs` as one batch, sending each its text as it grows and its end."""
        model = self.model
        tokenizer = model.module.tokenizer
        log.info("batch of %d (%d still queued)", len(jobs), self.queue.qsize())
        batch = model.collate([j.features for j in jobs]).to(model.device)
        template_stops = model.module.generator.stops(batch)

        def row_stop(row: int, tokens: list[int]) -> bool:
            job = jobs[row]
            if job.cancelled or len(tokens) >= job.max_tokens:
                return True
            tail = tokenizer.decode(tokens[-16:], skip_special_tokens=False)
            return any(s in tail for s in job.stop)

        seeds = None
        if temperature > 0:  # an unseeded request samples from a seed of its own
            seeds = [j.seed if j.seed is not None else random.getrandbits(31) for j in jobs]
        steps = model.module.generation_stream(
            batch,
            max(j.max_tokens for j in jobs),
            temperature=temperature,
            top_p=top_p,
            seed=seeds,
            stop=row_stop,
        )
        for step in steps:
            for row, token, finished in zip(step.rows, step.tokens, step.finished, strict=True):
                job = jobs[row]
                if token is not None:
                    job.tokens.append(token)
                stops = template_stops + job.stop
                text = tokenizer.decode(job.tokens, skip_special_tokens=False)
                cut = cut_at_stop(text, stops)
                if finished:
                    if len(cut) > job.shown:
                        job.emit({"delta": cut[job.shown :]})
                    at_length = token is not None and len(cut) == len(text)
                    job.emit(
                        {
                            "done": True,
                            "text": cut,
                            "finish_reason": "length" if at_length else "stop",
                            "usage": {
                                "prompt_tokens": job.prompt_tokens,
                                "completion_tokens": len(job.tokens),
                                "total_tokens": job.prompt_tokens + len(job.tokens),
                            },
                        }
                    )
                    continue
                safe = _safe_prefix(cut, stops) if len(cut) == len(text) else cut
                if len(safe) > job.shown:
                    job.emit({"delta": safe[job.shown :]})
                    job.shown = len(safe)


# ------------------------------------------------------------------------------------ app


def create_app(
    model: LMM,
    name: str,
    limits: Limits | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    wait: float = 0.005,
):
    """The FastAPI app serving `model` as `name` (see the module docstring)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    limits = limits or Limits()
    scheduler = Scheduler(model, max_batch, wait)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmm serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        log.info("refused %s %s: %s %s", request.method, request.url.path, err.status, err.message)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        log.exception("error on %s %s", request.method, request.url.path)
        body = RequestError(500, f"internal error: {type(err).__name__}", "internal_error").body()
        body["error"]["type"] = "server_error"
        return JSONResponse(body, status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise RequestError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key"
            )

    async def read_body(request: Request) -> bytes:
        too_big = RequestError(
            413, f"the request is larger than {limits.max_body_bytes} bytes", "request_too_large"
        )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def prepare(body: bytes) -> tuple[dict, Features]:
        with tempfile.TemporaryDirectory(prefix="lmm-serve-") as workdir:
            request = parse_request(body, name, limits, Path(workdir))
            try:
                sample = model.sample(request["messages"])
                sample.id = "0"  # as `LMM.generate` numbers a lone conversation: same seeds
                features = model.processor.prompt(sample)
            except Exception as err:
                if not (isinstance(err, ValueError) or is_user_error(err)):
                    raise
                raise RequestError(400, user_message(err), "invalid_messages", "messages") from err
        return request, features

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "queued": scheduler.queue.qsize()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = {"id": name, "object": "model", "created": created, "owned_by": "lmm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_body(request)
        parsed, features = await run_in_threadpool(prepare, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        job = Job(
            features,
            parsed["max_tokens"],
            parsed["temperature"],
            parsed["top_p"],
            parsed["seed"],
            parsed["stop"],
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        scheduler.submit(job)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": reply_id, "created": int(time.time()), "model": name}
        if parsed["stream"]:
            stream = _sse(events, job, head, parsed["include_usage"])
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            while True:
                event = await events.get()
                if "error" in event:
                    raise RuntimeError(event["error"])
                if event.get("done"):
                    break
        finally:
            job.cancelled = True  # the client may have gone: the row stops
        message = {"role": "assistant", "content": event["text"]}
        choice = {"index": 0, "message": message, "finish_reason": event["finish_reason"]}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": event["usage"]}

    return app


async def _sse(
    events: asyncio.Queue, job: Job, head: dict, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's `chat.completion.chunk` events for one request, then `[DONE]`."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        payload = {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if "error" in event:
                error = {
                    "message": event["error"],
                    "type": "server_error",
                    "code": "internal_error",
                }
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if "delta" in event:
                yield chunk({"content": event["delta"]})
            if event.get("done"):
                yield chunk({}, event["finish_reason"])
                if include_usage:
                    payload = {**head, "object": "chat.completion.chunk", "choices": []}
                    yield f"data: {json.dumps({**payload, 'usage': event['usage']})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> None:
    """`lmm serve MODEL`: the OpenAI-compatible server (see docs/serving.md)."""
    parser = argparse.ArgumentParser(prog="lmm serve", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--name", help="the model id clients send (default: the MODEL path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="gather window of a batch")
    defaults = Limits()
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    parser.add_argument("--max-images", type=int, default=defaults.max_images)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-image-side", type=int, default=defaults.max_image_side)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument(
        "--allow-local-files", type=Path, metavar="DIR",
        help="let requests name image files under DIR (never outside it); off by default",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError as err:
        raise UserError(
            "lmm serve needs fastapi and uvicorn; Fix: pip install 'lmm[serve]'"
        ) from err

    if args.allow_local_files is not None and not args.allow_local_files.is_dir():
        raise UserError(f"--allow-local-files {args.allow_local_files}: not a folder")
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_image_side=args.max_image_side,
        max_tokens=args.max_tokens,
        allow_local_files=args.allow_local_files,
    )
    model = load_from_arguments(args)
    name = args.name or args.model
    app = create_app(model, name, limits, args.api_key, args.max_batch, args.batch_wait_ms / 1000)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("serving on %s without --api-key: anyone who reaches it can use it", args.host)
    log.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
