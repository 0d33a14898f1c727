"""Load check for `mlx-dllm serve`: N chat requests at concurrency C; completed and failed counts, latency
percentiles and tokens/s. With --multi-turn K, C chats of K turns each instead, every turn resending the growing
history, streamed: the median time to first token and cached prompt tokens per turn. Not a timed test: numbers
for the note.

    python benchmarks/serve_load.py --url http://127.0.0.1:8080/v1 -n 64 -c 8
    python benchmarks/serve_load.py --model default -n 64 -c 8      # starts a server in this process
    python benchmarks/serve_load.py --model default -c 4 --decode-concurrency 4 --multi-turn 6 --prompt-cache-size 0

Prompts come from a built-in set (gsm8k, mt-bench, humaneval), round-robin. Requests use only the standard
library, so the check runs wherever the server does.
"""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def chat_request(url: str, body: dict, api_key) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(), headers, method="POST")


def post(url: str, body: dict, api_key):
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(chat_request(url, body, api_key), timeout=600) as response:
            reply = json.loads(response.read())
            return 200, time.perf_counter() - started, reply["usage"]["completion_tokens"], reply.get("mlx_dllm")
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - started, 0, None
    except OSError:
        return "connection", time.perf_counter() - started, 0, None


def load_check(url, prompts, requests, concurrency, max_tokens, mode, api_key):
    def one(index):
        body = {"model": "any", "messages": [{"role": "user", "content": prompts[index % len(prompts)]}],
                "max_tokens": max_tokens}
        if mode:
            body["mode"] = mode
        return post(url, body, api_key)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    done = [r for r in results if r[0] == 200]
    latencies = np.array([r[1] for r in done]) if done else np.zeros(1)
    tokens = sum(r[2] for r in done)
    acceptance = [r[3]["acceptance_length"] for r in done if r[3] and r[3].get("acceptance_length")]
    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
        "completed": len(done), "failed": dict(Counter(str(r[0]) for r in results if r[0] != 200)),
        "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_latency_s": round(float(np.percentile(latencies, 95)), 3),
        "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
        "mean_acceptance_length": round(float(np.mean(acceptance)), 3) if acceptance else None,
        "mode": done[0][3]["mode"] if done and done[0][3] else mode,
    }


def stream_chat(url: str, body: dict, api_key):
    """One streamed chat request: (seconds to its first content, the reply's text, its usage)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started, first, text, usage = time.perf_counter(), None, "", None
    with urllib.request.urlopen(chat_request(url, body, api_key), timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server failed a turn: {chunk['error']['message']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", ()):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - started
                    text += choice["delta"]["content"]
    return first if first is not None else time.perf_counter() - started, text, usage


def multi_turn(url, prompts, turns, chats, max_tokens, mode, api_key):
    """`chats` conversations at once, each of `turns` turns resending its whole history (what a chat client does):
    per turn, the median over chats of the time to first token and of the cached prompt tokens."""

    def chat(index):
        messages, rows = [], []
        for turn in range(turns):
            messages.append({"role": "user", "content": prompts[(index * turns + turn) % len(prompts)]})
            body = {"model": "any", "messages": messages, "max_tokens": max_tokens, **({"mode": mode} if mode else {})}
            ttft, text, usage = stream_chat(url, body, api_key)
            messages.append({"role": "assistant", "content": text})
            rows.append((ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        return rows

    with ThreadPoolExecutor(chats) as pool:
        results = np.array(list(pool.map(chat, range(chats))))  # [chat, turn, (ttft, prompt, cached)]
    medians = np.median(results, axis=0)
    return {
        "chats": chats, "turns": turns, "max_tokens": max_tokens,
        "ttft_s_per_turn": [round(float(t), 3) for t in medians[:, 0]],
        "prompt_tokens_per_turn": [int(t) for t in medians[:, 1]],
        "cached_tokens_per_turn": [int(t) for t in medians[:, 2]],
    }


def start_server(model, draft_model, decode_concurrency=1, prompt_cache_size=10):
    """A server on a free port of 127.0.0.1 in this process, as `mlx-dllm serve` builds it."""
    from mlx_dllm.cli.generate import choose_drafter
    from mlx_dllm.loading import load_pair
    from mlx_dllm.server.app import Settings
    from mlx_dllm.server.run import build, listen, uvicorn_server
    from mlx_dllm.server.worker import Loaded

    draft = choose_drafter(model, draft_model, False, None)  # `default` (or its hub id) brings its shipped drafter
    sock = listen("127.0.0.1", 0)
    settings = Settings(max_tokens=4096, decode_concurrency=decode_concurrency, prompt_cache_size=prompt_cache_size)
    app, _ = build(lambda: Loaded(*load_pair(model, draft)), settings, 1024)
    server = uvicorn_server(app, "warning")
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running server's /v1 URL.")
    parser.add_argument("--model", help="Start a server for this model here instead ('default': the default one).")
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("-n", "--requests", type=int, default=32)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("-m", "--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--multi-turn", type=int, default=None, metavar="K",
                        help="Replay -c chats of K turns each (streamed) instead of -n single requests.")
    parser.add_argument("--decode-concurrency", type=int, default=1, help="The started server's (with --model).")
    parser.add_argument("--prompt-cache-size", type=int, default=10, help="The started server's (0: no reuse).")
    args = parser.parse_args()
    if (args.url is None) == (args.model is None):
        parser.error("give --url or --model")
    from mlx_dllm.benchmark.prompts import read_prompts

    url = args.url or start_server(args.model, args.draft_model, args.decode_concurrency, args.prompt_cache_size)
    if args.multi_turn:
        prompts = read_prompts(args.prompts, args.multi_turn * args.concurrency)
        result = multi_turn(url, prompts, args.multi_turn, args.concurrency, args.max_tokens, args.mode, args.api_key)
    else:
        prompts = read_prompts(args.prompts, args.requests)
        result = load_check(url, prompts, args.requests, args.concurrency, args.max_tokens, args.mode, args.api_key)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
