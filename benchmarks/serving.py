"""`lmm serve` under load: requests/s of 32 concurrent clients vs the same requests one at a time.

One `lmm serve` subprocess on 127.0.0.1 serves the quickstart-sized tiny model (CLIP 32 px /
patch 4 with a 2x2-merging connector, 4-layer Llama with hidden 128; untrained, from
`recipes/tiny/llava_synthetic.yaml`, so answers run to `--max-tokens`). The requests are 32
different questions with 0-3 images each (data: URIs), greedy. First every request alone (each
is a batch of 1), then all 32 at once from 32 threads (the server's scheduler batches what is
queued, up to `--max-batch`). Each timing is the best of `--repeats` after a warm-up. The last
line is one JSON object with `speedup` and `identical` (the concurrent answers equal the lone
ones).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "llava_synthetic.yaml"
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (140, 40, 160)]


def recipe(root: Path) -> Path:
    """The quickstart recipe with its model paths pointing at freshly built tiny assets."""
    from lmm.data.synthetic import corpus
    from lmm.tiny import QUICKSTART_SIZES, build_tiny_assets

    assets = build_tiny_assets(root / "tiny", corpus(), **QUICKSTART_SIZES)
    config = yaml.safe_load(RECIPE.read_text())
    model = config["model"]["init_args"]
    model["tokenizer"] = str(assets["tokenizer"])
    model["model"]["init_args"]["vision"]["init_args"]["path"] = str(assets["vision"])
    model["model"]["init_args"]["llm"]["init_args"]["path"] = str(assets["llm"])
    out = root / "recipe.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def requests(n: int, max_tokens: int) -> list[dict]:
    out = []
    for k in range(n):
        content = [
            {"type": "text", "text": f"Question {k}: which shape is {'big ' * (k % 5)}here?"}
        ]
        for j in range(k % 4):
            image = io.BytesIO()
            Image.new("RGB", (32, 24 + 8 * j), COLOURS[(k + j) % 5]).save(image, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        messages = [{"role": "user", "content": content}]
        out.append({"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = root / "server.log"
        command = [
            sys.executable, "-m", "lmm.cli", "serve", str(recipe(root)), "--port", str(port),
            "--max-batch", str(args.max_batch), "--max-tokens", str(args.max_tokens),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(log, "w") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(
                            f"lmm serve did not start:\n{log.read_text()[-3000:]}"
                        ) from None
                    time.sleep(0.2)
            bodies = requests(args.clients, args.max_tokens)
            with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)) as http:

                def ask(body: dict) -> str:
                    reply = http.post(url, json=body)
                    reply.raise_for_status()
                    return reply.json()["choices"][0]["message"]["content"]

                ask(bodies[0])  # warm-up
                lone_times, together_times = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    alone = [ask(b) for b in bodies]
                    lone_times.append(time.perf_counter() - start)
                    with ThreadPoolExecutor(args.clients) as pool:
                        start = time.perf_counter()
                        together = list(pool.map(ask, bodies))
                        together_times.append(time.perf_counter() - start)
                    if together != alone:
                        break
        finally:
            server.terminate()
            server.wait(timeout=30)
        sizes = [int(n) for n in re.findall(r"batch of (\d+)", log.read_text())]
    lone, conc = min(lone_times), min(together_times)
    result = {
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "one_at_a_time_rps": round(args.clients / lone, 2),
        "concurrent_rps": round(args.clients / conc, 2),
        "speedup": round(lone / conc, 2),
        "largest_batch": max(sizes),
        "identical": together == alone,
        "distinct_answers": len(set(alone)),
    }
    print(f"one at a time: {lone:.2f} s, {args.clients} concurrent: {conc:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
