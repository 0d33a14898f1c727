"""`mlx-dllm serve` through the real `openai` client, against servers started here on 127.0.0.1.

Tiny random checkpoints of all three families; every answer must equal `mlx_dllm.generate` for the same
prompt, mode and seed.
"""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest

import mlx_dllm
from mlx_dllm.benchmark.tiny import build_tiny
from mlx_dllm.chat_template import template_ids
from mlx_dllm.server.app import Settings
from mlx_dllm.server.run import build, listen, uvicorn_server
from mlx_dllm.server.worker import Loaded
from tests.test_cli import assert_user_error, run

TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}w7"
MESSAGES = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w5 w9 w12"}]
# Every mode of each family, with the sampling that exercises it (a seed where a mode draws at random).
CASES = {
    "dflash": [dict(mode="ar"), dict(mode="ar", temperature=0.8, seed=3), dict(mode="dflash")],
    "diffusion-gemma": [dict(mode="diffusion", seed=5)],
    "nemotron": [dict(mode="ar"), dict(mode="diffusion"), dict(mode="linear-spec"), dict(mode="quadratic-spec")],
}
GENERATE_NAMES = {"temperature": "temp"}


def add_chat_template(folder):
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = TEMPLATE
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (model folder, draft folder or None), each with a chat template."""
    built = {}
    for family in CASES:
        model, draft = build_tiny(family, tmp_path_factory.mktemp(family))
        add_chat_template(model)
        built[family] = (model, draft)
    return built


@contextmanager
def serving(model, draft=None, max_queue=64, names=("tiny",), **settings):
    """A server on a free port of 127.0.0.1 in this process, serving the model under `names`; yields its /v1 URL."""
    sock = listen("127.0.0.1", 0)

    def load():
        loaded = mlx_dllm.load(str(model))
        return Loaded(loaded[0], loaded[1], mlx_dllm.load(str(draft))[0] if draft else None, name=names[0],
                      aliases=tuple(names[1:]))

    app, worker = build(load, Settings(**settings), max_queue)
    server = uvicorn_server(app, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        worker.stop()
        sock.close()


def client(url, api_key="unused", **options):
    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=60, **options)


def ours(case):
    """The request's extra body (our fields) and its sampling fields, from a case."""
    sampling = {k: v for k, v in case.items() if k in ("temperature", "seed")}
    return sampling, {"mode": case["mode"]}


def expected(folder, draft, prompt, case, max_tokens):
    model, tokenizer = mlx_dllm.load(str(folder))
    draft_model = mlx_dllm.load(str(draft))[0] if draft else None
    options = {GENERATE_NAMES.get(k, k): v for k, v in case.items()}
    return mlx_dllm.generate(model, tokenizer, prompt, max_tokens=max_tokens, draft_model=draft_model, **options)


@pytest.mark.parametrize("family", list(CASES))
def test_chat_and_completions_streamed_or_not_equal_generate(tiny, family):
    folder, draft = tiny[family]
    tokenizer = mlx_dllm.load(str(folder))[1]
    chat_ids = template_ids(tokenizer, MESSAGES)
    with serving(folder, draft) as url:
        api = client(url)
        for case in CASES[family]:
            sampling, extra = ours(case)
            want_chat = expected(folder, draft, chat_ids, case, 12)
            want_text = expected(folder, draft, "w20 w30 w40", case, 12)
            reply = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, extra_body=extra,
                                                **sampling)
            assert reply.choices[0].message.content == want_chat, case
            assert reply.usage.prompt_tokens == len(chat_ids)
            chunks = list(api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True,
                                                      stream_options={"include_usage": True}, extra_body=extra,
                                                      **sampling))
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat, case
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
            assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
            completion = api.completions.create(model="tiny", prompt="w20 w30 w40", max_tokens=12, extra_body=extra,
                                                **sampling)
            assert completion.choices[0].text == want_text, case
            streamed = api.completions.create(model="tiny", prompt="w20 w30 w40", max_tokens=12, stream=True,
                                              extra_body=extra, **sampling)
            assert "".join(c.choices[0].text for c in streamed) == want_text, case
        assert [m.id for m in api.models.list().data] == ["tiny"]


def raw_post(url, body: bytes, headers=None):
    request = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


BAD = [
    (dict(extra_body={"mode": "telepathy"}), "unknown mode 'telepathy' (choose from ar, dflash)"),
    (dict(max_tokens=-3), "max_tokens must be positive, got -3"),
    (dict(max_tokens=10_000), "max_tokens must be at most 512 (the server's --max-tokens), got 10000"),
    (dict(temperature="hot"), "temp must be a finite number, got 'hot'"),
    (dict(extra_body={"top_k": 2.5}), "top_k must be an integer, got 2.5"),
    (dict(extra_body={"mode": "quadratic-spec"}), "models support ar, dflash, not quadratic-spec"),
    (dict(extra_body={"block_size": 1}), "block size must be at least 2, got 1"),
    (dict(extra_body={"frobnicate": 1}), "unknown field frobnicate"),
    (dict(n=2), "n=2 is not supported"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text content is supported"),
]


@pytest.mark.parametrize("request_options, message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_get_400_with_our_one_line_message(tiny, request_options, message):
    folder, draft = tiny["dflash"]
    with serving(folder, draft) as url:
        options = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **request_options}
        with pytest.raises(openai.BadRequestError) as raised:
            client(url).chat.completions.create(**options)
        error = raised.value.response.json()["error"]
        assert message in error["message"] and "\n" not in error["message"]
        assert error["type"] == "invalid_request_error"
        assert client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_oversize_and_broken_bodies_get_400_and_the_server_keeps_serving(tiny):
    folder, draft = tiny["dflash"]
    with serving(folder, draft, max_body_bytes=2000) as url:
        big = json.dumps({"messages": [{"role": "user", "content": "w5 " * 1000}]}).encode()
        status, body = raw_post(url, big)
        assert status == 400 and "over the server's limit of 2000 bytes" in body["error"]["message"]
        for broken in (b"{not json", b"[" * 1900):
            status, body = raw_post(url, broken)
            assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
        status, body = raw_post(url, json.dumps({"messages": MESSAGES, "max_tokens": 3}).encode())
        assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_forty_concurrent_requests_from_eight_threads_all_complete_unmixed(tiny):
    folder, draft = tiny["dflash"]
    prompts = [f"w{2 + i} w{50 + 3 * i} w{200 - i}" for i in range(40)]
    model, tokenizer = mlx_dllm.load(str(folder))
    draft_model = mlx_dllm.load(str(draft))[0]
    want = [mlx_dllm.generate(model, tokenizer, p, max_tokens=10, draft_model=draft_model,
                              mode="dflash" if i % 2 else "ar") for i, p in enumerate(prompts)]
    assert len(set(want)) > 30  # distinct answers, so a mix-up would show
    with serving(folder, draft) as url:
        api = client(url)

        def ask(index):
            extra = {"mode": "dflash" if index % 2 else "ar"}
            if index % 3:
                return api.completions.create(model="tiny", prompt=prompts[index], max_tokens=10,
                                              extra_body=extra).choices[0].text
            stream = api.completions.create(model="tiny", prompt=prompts[index], max_tokens=10, stream=True,
                                            extra_body=extra)
            return "".join(chunk.choices[0].text for chunk in stream)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(40)))
        assert got == want
        metrics = json.loads(urllib.request.urlopen(url.replace("/v1", "/metrics")).read())
        assert metrics["modes"]["ar"]["requests"] == 20 and metrics["modes"]["dflash"]["requests"] == 20
        assert metrics["modes"]["dflash"]["acceptance_length"] >= 1 and metrics["queued"] == 0
        assert metrics["modes"]["ar"]["cancelled"] == metrics["modes"]["dflash"]["cancelled"] == 0


def slowed(monkeypatch, seconds=0.02):
    """Every response of every generation takes `seconds` longer, so a test can act mid-generation."""
    original = mlx_dllm.stream_generate

    def slow(*args, **kwargs):
        for response in original(*args, **kwargs):
            time.sleep(seconds)
            yield response

    monkeypatch.setattr(mlx_dllm, "stream_generate", slow)


def long_prompt(folder, tokens):
    """A prompt whose greedy AR answer runs to `tokens` without an end-of-sequence."""
    model, tokenizer = mlx_dllm.load(str(folder))
    for start in range(2, 60):
        last = list(mlx_dllm.stream_generate(model, tokenizer, f"w{start} w{start + 1}", tokens, mode="ar"))[-1]
        if last.finish_reason == "length":
            return f"w{start} w{start + 1}"
    pytest.fail("no prompt runs to length")


def test_a_client_that_disconnects_mid_stream_stops_its_generation(tiny, monkeypatch):
    folder, draft = tiny["dflash"]
    prompt = long_prompt(folder, 300)
    slowed(monkeypatch)
    with serving(folder, draft) as url:
        api = client(url)
        stream = api.completions.create(model="tiny", prompt=prompt, max_tokens=300, stream=True,
                                        extra_body={"mode": "ar"})
        next(iter(stream))
        stream.close()  # 300 tokens would take 6 s; the generation must stop long before
        started = time.time()
        answer = api.completions.create(model="tiny", prompt="w9 w10", max_tokens=3, extra_body={"mode": "ar"})
        assert answer.usage.completion_tokens == 3 and time.time() - started < 4
        metrics = json.loads(urllib.request.urlopen(url.replace("/v1", "/metrics")).read())["modes"]["ar"]
        assert metrics["cancelled"] == 1 and metrics["generation_tokens"] < 150


def test_a_full_queue_answers_429(tiny, monkeypatch):
    folder, draft = tiny["dflash"]
    prompt = long_prompt(folder, 40)
    slowed(monkeypatch, 0.05)
    running = threading.Event()
    slow = mlx_dllm.stream_generate

    def signalling(*args, **kwargs):
        for response in slow(*args, **kwargs):
            running.set()
            yield response

    monkeypatch.setattr(mlx_dllm, "stream_generate", signalling)
    with serving(folder, draft, max_queue=1) as url:
        api = client(url)

        def ask(_):
            try:
                return api.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                              extra_body={"mode": "ar"}).usage.completion_tokens
            except openai.RateLimitError as error:
                return error.response.json()["error"]["type"]

        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(ask, 0)
            assert running.wait(60)  # the first is generating (about 2 s of it left), not still queued
            outcomes = [*pool.map(ask, range(3)), first.result()]
        # One runs, one waits; the other two arrive while both places are taken.
        assert outcomes.count(40) == 2 and outcomes.count("rate_limit_error") == 2, outcomes


def test_a_failing_generation_is_a_500_without_its_traceback(tiny, monkeypatch):
    folder, draft = tiny["dflash"]

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")
        yield

    with serving(folder, draft) as url:
        monkeypatch.setattr(mlx_dllm, "stream_generate", broken)
        with pytest.raises(openai.InternalServerError) as raised:
            client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        body = raised.value.response.text
        assert "secret" not in body and "Traceback" not in body
        assert raised.value.response.json()["error"]["type"] == "server_error"
        monkeypatch.undo()
        assert client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).choices


def test_the_api_key_guards_every_route_but_health(tiny):
    folder, draft = tiny["dflash"]
    with serving(folder, draft, api_key="sesame") as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="sesame").chat.completions.create(model="tiny", messages=MESSAGES,
                                                                     max_tokens=2).choices
        health = urllib.request.urlopen(url.replace("/v1", "/health"))
        assert health.status == 200
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(url.replace("/v1", "/metrics"))
        assert raised.value.code == 401


def test_serve_cli_refuses_a_port_in_use_and_warns_off_localhost(tiny, monkeypatch):
    folder, _ = tiny["dflash"]
    taken = listen("127.0.0.1", 0)
    try:
        result = run("serve", "--model", folder, "--port", taken.getsockname()[1])
        assert_user_error(result, f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}")
    finally:
        taken.close()
    served = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: served.append(sockets[0].getsockname()))
    result = run("serve", "--model", folder, "--host", "0.0.0.0", "--port", 0)
    assert result.exit_code == 0, result.output
    assert "[WARNING] Listening on 0.0.0.0" in result.stderr and "set --api-key" in result.stderr
    assert served and served[0][0] == "0.0.0.0"
    assert_user_error(run("serve", "--model", folder / "missing", "--port", 0), "missing")


def test_the_load_check_counts_what_it_sent(tiny, monkeypatch):
    from benchmarks.serve_load import load_check
    from mlx_dllm.sampler import dflash
    from mlx_dllm.sampler.cost_curve import CostCurve

    # A flat verify: auto drafts, where the tiny model's measured curve may have it run AR steps only.
    monkeypatch.setattr(dflash, "measured_costs", lambda *args: CostCurve((1, 32), (0.01, 0.01), 0.002))
    folder, draft = tiny["dflash"]
    with serving(folder, draft) as url:
        result = load_check(url, ["w5 w6", "w7 w8 w9"], requests=6, concurrency=3, max_tokens=4, mode="dflash",
                            api_key=None)
    assert result["completed"] == 6 and result["failed"] == {} and result["tokens"] == 24
    assert result["p50_latency_s"] <= result["p95_latency_s"] and result["mean_acceptance_length"] >= 1
