"""Load check for `mlx-dllm serve`: N chat requests at concurrency C; completed and failed counts, latency
percentiles and tokens/s. With --multi-turn K, C chats of K turns each instead, every turn resending the growing
history, streamed: the median time to first token and cached prompt tokens per turn. With --disconnect P, a soak:
every request streamed, the client closing a fraction P of them (seeded by --seed) at a random point, before the
first chunk or after a few; it counts the completed, the clean errors (an HTTP error with a JSON error body), the
ones we left and the lost (a hang past --timeout, a stream broken by the server, a 5xx), then checks the server
still answers and, from its /metrics, that every request it took has finished. Not a timed test: numbers for the
note.

    python benchmarks/serve_load.py --url http://127.0.0.1:8080/v1 -n 64 -c 8
    python benchmarks/serve_load.py --model default -n 64 -c 8      # starts a server in this process
    python benchmarks/serve_load.py --model default -c 4 --decode-concurrency 4 --multi-turn 6 --prompt-cache-size 0
    python benchmarks/serve_load.py --model default -n 64 -c 8 --decode-concurrency 8 --disconnect 0.3 --seed 0

Prompts come from a built-in set (gsm8k, mt-bench, humaneval), round-robin. Requests use only the standard
library, so the check runs wherever the server does.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
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


def headers_for(api_key) -> dict:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def soak_request(url: str, body: dict, api_key, leave_after, wait: float, timeout: float):
    """One streamed chat request that the client leaves after `leave_after` chunks (None: reads it to its end; 0:
    `wait` seconds after sending it, before the first chunk): (outcome, detail, completion tokens, seconds), the
    outcome one of completed, clean_error, disconnected or lost."""
    started = time.perf_counter()
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        connection.request("POST", f"{parts.path.rstrip('/')}/chat/completions", json.dumps(body),
                           headers_for(api_key))
        if leave_after == 0:
            time.sleep(wait)
            return "disconnected", "before_first_chunk", 0, time.perf_counter() - started
        response = connection.getresponse()
        outcome = read_stream(response, leave_after) if response.status == 200 else refusal(response)
    except TimeoutError:
        outcome = "lost", f"no byte in {timeout:g} s", 0
    except (OSError, http.client.HTTPException) as error:  # a reset, a truncated chunked body, a bad status line
        outcome = "lost", f"broken: {type(error).__name__}", 0
    except ValueError:
        outcome = "lost", "a chunk that is not JSON", 0
    finally:
        connection.close()  # a request left early: the server sees the connection close here
    return (*outcome, time.perf_counter() - started)


def refusal(response):
    """A non-200 answer: a clean error if it is under 500 with an OpenAI-style JSON error body."""
    try:
        clean = response.status < 500 and "message" in json.loads(response.read())["error"]
    except (ValueError, KeyError, TypeError):
        clean = False
    return ("clean_error" if clean else "lost"), str(response.status), 0


def read_stream(response, leave_after):
    """(outcome, detail, tokens) of a 200 stream, read to `data: [DONE]` or left after `leave_after` chunks."""
    chunks, finish, tokens = 0, None, 0
    for line in response:
        if line.strip() == b"data: [DONE]":
            if finish is None:
                return "lost", "[DONE] without a finish_reason", 0
            return "completed", finish, tokens
        if not line.startswith(b"data: "):
            continue
        chunk = json.loads(line[len(b"data: "):])
        if "error" in chunk:  # the generation failed after the stream began: clean if it is not the server's fault
            kind = chunk["error"].get("type")
            return ("lost" if kind in (None, "server_error") else "clean_error"), f"in stream: {kind}", 0
        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        finish = next((c["finish_reason"] for c in chunk.get("choices", ()) if c.get("finish_reason")), finish)
        chunks += 1
        if leave_after is not None and chunks >= leave_after:
            return "disconnected", "mid_stream", 0
    return "lost", "stream ended without [DONE]", 0


def get_json(url: str, api_key, timeout: float = 30):
    request = urllib.request.Request(url, headers=headers_for(api_key))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def taken(url: str, api_key):
    """(requests the server has finished or refused, requests queued, requests it stopped for a client that left)
    from its /metrics; None without one."""
    try:
        snapshot = get_json(f"{url.rsplit('/v1', 1)[0]}/metrics", api_key)
    except (OSError, ValueError):
        return None
    modes, refused = snapshot["modes"].values(), snapshot["refused"]
    done = sum(mode["requests"] for mode in modes) + sum(refused.values())
    return done, snapshot["queued"], sum(mode["cancelled"] for mode in modes) + refused.get("cancelled", 0)


def soak(url, prompts, requests, concurrency, max_tokens, mode, api_key, disconnect, seed, timeout, after=4):
    """`requests` streamed requests at `concurrency`, a fraction `disconnect` of them left at a random point; then
    `after` plain requests, /health, and /metrics until every request the server took has finished."""
    rng = np.random.default_rng(seed)
    leaves = [int(rng.integers(0, max(1, max_tokens // 8) + 1)) if rng.random() < disconnect else None
              for _ in range(requests)]
    waits = rng.uniform(0, 2, requests)
    before = taken(url, api_key)

    def one(index):
        body = {"model": "any", "messages": [{"role": "user", "content": prompts[index % len(prompts)]}],
                "max_tokens": max_tokens, **({"mode": mode} if mode else {})}
        return soak_request(url, body, api_key, leaves[index], waits[index], timeout)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    by = {kind: [r for r in results if r[0] == kind] for kind in ("completed", "clean_error", "disconnected", "lost")}
    latencies = np.array([r[3] for r in by["completed"]]) if by["completed"] else np.zeros(1)
    tokens = sum(r[2] for r in by["completed"])
    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "disconnect": disconnect,
        "seed": seed, "completed": len(by["completed"]),
        "finish_reasons": dict(Counter(r[1] for r in by["completed"])),
        "clean_errors": dict(Counter(r[1] for r in by["clean_error"])),
        "disconnected": dict(Counter(r[1] for r in by["disconnected"])),
        "lost": len(by["lost"]), "lost_detail": dict(Counter(r[1] for r in by["lost"])),
        "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_latency_s": round(float(np.percentile(latencies, 95)), 3),
        "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
        **health(url, prompts, api_key, after, max_tokens, mode, before, requests + after, timeout),
    }


def health(url, prompts, api_key, count, max_tokens, mode, before, sent, timeout):
    """After the soak: `count` plain requests must complete and /health answer; then, where the server has
    /metrics, nothing queued and every request it took (the soak's and these, `sent`) finished within `timeout`."""
    done = load_check(url, prompts, count, count, max_tokens, mode, api_key)["completed"]
    try:
        ok = get_json(f"{url.rsplit('/v1', 1)[0]}/health", api_key).get("status") == "ok"
    except (OSError, ValueError):
        ok = False
    started, deadline, now = time.perf_counter(), time.perf_counter() + timeout, taken(url, api_key)
    while before is not None and now is not None and (now[0] - before[0] < sent or now[1]) and \
            time.perf_counter() < deadline:
        time.sleep(0.2)
        now = taken(url, api_key)
    counted = before is not None and now is not None
    unfinished = sent - (now[0] - before[0]) + now[1] if counted else None
    return {"after_completed": f"{done}/{count}", "health_ok": ok, "unfinished_after": unfinished,
            "server_cancelled": now[2] - before[2] if counted else None,
            "settled_s": round(time.perf_counter() - started, 2),
            "healthy": done == count and ok and unfinished in (0, None)}


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
    parser.add_argument("--disconnect", type=float, default=None, metavar="P",
                        help="Soak: stream every request, the client leaving each with probability P.")
    parser.add_argument("--seed", type=int, default=0, help="Which requests --disconnect leaves, and when.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds a soak request may wait for a byte.")
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
    elif args.disconnect is not None:
        prompts = read_prompts(args.prompts, args.requests)
        result = soak(url, prompts, args.requests, args.concurrency, args.max_tokens, args.mode, args.api_key,
                      args.disconnect, args.seed, args.timeout)
    else:
        prompts = read_prompts(args.prompts, args.requests)
        result = load_check(url, prompts, args.requests, args.concurrency, args.max_tokens, args.mode, args.api_key)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    if args.disconnect is not None and (result["lost"] or not result["healthy"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
