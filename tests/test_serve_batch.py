"""`mlx-dllm serve --decode-concurrency 4`: requests decoded together in one BatchEngine answer exactly what the
one-at-a-time server answers (tiny DFlash checkpoint, greedy), streamed or not, with stop strings, beside requests
that must run alone, a client that leaves, a row whose logits go non-finite, and tool calls; conversations resume
their earlier turns from the prompt cache as one at a time.
"""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import mlx_dllm
from mlx_dllm.benchmark.tiny import build_tiny
from mlx_dllm.chat_template import template_ids
from mlx_dllm.sampler.batch import BatchEngine
from mlx_dllm.sampler.common import NOT_FINITE_MESSAGE, TokenSelector
from tests.test_serve import BAD, MESSAGES, add_chat_template, client, long_prompt, serving
from tests.test_serve_tools import ASK, CALLS, TOOLS, call_of, checkpoints, forcing  # noqa: F401 - a fixture

CONCURRENCY = 4
# (route, fields): prompts of different lengths, max_tokens, modes, block sizes and sampling; DFlash rows leave
# speculation at its default (auto alone, an adaptive chain in the batch).
REQUESTS = [
    ("text", dict(prompt="w5", max_tokens=7)),
    ("text", dict(prompt="w20 w30 w40 w50 w60 w70 w80", max_tokens=24)),
    ("chat", dict(messages=MESSAGES, max_tokens=16)),
    ("text", dict(prompt="w9 w10 w11", max_tokens=31, extra_body={"mode": "ar"})),
    ("text", dict(prompt="w100 w7 w64", max_tokens=18, extra_body={"block_size": 4})),
    ("chat", dict(messages=[{"role": "user", "content": "w8 w9"}], max_tokens=12,
                  extra_body={"num_draft_tokens": 2})),
    ("text", dict(prompt="w11 w12", max_tokens=15, temperature=0.8, seed=3, extra_body={"mode": "ar"})),
]
TREE = ("text", dict(prompt="w40 w41 w42", max_tokens=14, extra_body={"speculation": "tree"}))


def ask(api, request, stream=False):
    """(text, finish reason, completion tokens) of one request, streamed (with usage) or not."""
    route, fields = request
    create = api.chat.completions.create if route == "chat" else api.completions.create
    fields = {"model": "tiny", **fields}
    if not stream:
        reply = create(**fields)
        choice = reply.choices[0]
        return (choice.message.content if route == "chat" else choice.text), choice.finish_reason, \
            reply.usage.completion_tokens
    chunks = list(create(**fields, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content if route == "chat" else c.choices[0].text for c in chunks if c.choices]
    return "".join(p or "" for p in pieces), chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens


def with_stop(request, text):
    """The request again, stopping at its answer's fourth word."""
    words = text.split()
    assert len(words) > 4, text
    route, fields = request
    return route, {**fields, "stop": [words[3]]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, draft = build_tiny("dflash", tmp_path_factory.mktemp("dflash"))
    add_chat_template(model)
    return model, draft


@pytest.fixture(scope="module")
def answers(tiny):
    """request -> what the one-at-a-time server answers it: REQUESTS, two of them with a stop string, and TREE."""
    with serving(*tiny) as url:
        api = client(url)
        answers = {}
        for request in [*REQUESTS, TREE]:
            answers[key(request)] = ask(api, request)
        stopping = [with_stop(request, answers[key(request)][0]) for request in REQUESTS[1:3]]
        for request in stopping:
            answers[key(request)] = ask(api, request)
            assert answers[key(request)][1] == "stop"
    return answers, stopping


def key(request):
    return json.dumps(request, sort_keys=True)


class Spy:
    """Watches the batch: the most rows a step ran, the jobs that ran alone (`stream_generate`), the engine's cancels;
    while `gate` is clear, the first step waits (`held`: the requests the engine had then); each step takes `delay`
    seconds longer, so a test can act mid-generation."""

    def __init__(self, monkeypatch):
        self.gate, self.held, self.widest, self.alone, self.cancelled, self.delay = threading.Event(), None, 0, 0, 0, 0
        self.gate.set()
        step, cancel, stream_generate = BatchEngine.step, BatchEngine.cancel, mlx_dllm.stream_generate

        def spied_step(engine):
            if not self.gate.is_set():
                self.held = len(engine)
                self.gate.wait(60)
            time.sleep(self.delay)
            events = step(engine)
            self.widest = max(self.widest, len(engine.rows))
            return events

        def spied_cancel(engine, uid):
            found = cancel(engine, uid)
            self.cancelled += found
            return found

        def spied_stream_generate(*args, **kwargs):
            self.alone += 1
            return stream_generate(*args, **kwargs)

        monkeypatch.setattr(BatchEngine, "step", spied_step)
        monkeypatch.setattr(BatchEngine, "cancel", spied_cancel)
        monkeypatch.setattr(mlx_dllm, "stream_generate", spied_stream_generate)


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def metrics(url):
    return json.loads(urllib.request.urlopen(url.replace("/v1", "/metrics")).read())


def wait_until(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_streamed_or_not_answer_as_one_at_a_time(tiny, answers, spy):
    """Nine requests queued at once fill the batch (four rows), the others join as rows finish; every answer,
    streamed or not, greedy or seeded, is the one-at-a-time server's: text, finish reason and completion tokens."""
    expected, stopping = answers
    requests = [*REQUESTS, *stopping]
    with serving(*tiny, decode_concurrency=CONCURRENCY) as url:
        api = client(url)
        for streamed in (False, True):
            spy.gate.clear()
            spy.held = None
            with ThreadPoolExecutor(len(requests)) as pool:
                futures = [pool.submit(ask, api, request, streamed ^ (i % 2 == 1)) for i, request in
                           enumerate(requests)]
                queue_together(spy, url, len(requests))
                got = [future.result() for future in futures]
            assert got == [expected[key(request)] for request in requests]
        assert spy.widest == CONCURRENCY and spy.alone == 0
        counted = metrics(url)["modes"]
        assert counted["dflash"]["requests"] == 14 and counted["ar"]["requests"] == 4
        assert counted["dflash"]["acceptance_length"] >= 1
        # The second pass's AR rows resumed the first's K/V states, trimmed back (a DFlash state, untrimmable, resumes
        # only a prompt that extends it) and answered the same.
        assert counted["ar"]["cached_tokens"] > 0


def test_a_request_that_must_run_alone_runs_beside_the_batch(tiny, answers, spy):
    expected, _ = answers
    requests = [REQUESTS[0], TREE, REQUESTS[3], REQUESTS[4]]
    with serving(*tiny, decode_concurrency=CONCURRENCY) as url:
        api = client(url)
        with ThreadPoolExecutor(len(requests)) as pool:
            got = list(pool.map(lambda request: ask(api, request), requests))
    assert got == [expected[key(request)] for request in requests]
    assert spy.alone == 1  # the tree, through stream_generate as with one request at a time


def test_a_client_that_disconnects_frees_its_row_and_the_others_finish_exactly(tiny, answers, spy):
    expected, _ = answers
    folder, _ = tiny
    prompt = long_prompt(folder, 300)
    spy.alone = 0  # long_prompt's own generations
    spy.delay = 0.02  # 300 tokens would take 6 s; the row must leave long before
    others = [REQUESTS[0], REQUESTS[3], REQUESTS[5]]
    with serving(*tiny, decode_concurrency=CONCURRENCY) as url:
        api = client(url)
        stream = api.completions.create(model="tiny", prompt=prompt, max_tokens=300, stream=True,
                                        extra_body={"mode": "ar"})
        next(iter(stream))
        with ThreadPoolExecutor(len(others)) as pool:
            futures = [pool.submit(ask, api, request) for request in others]
            wait_until(lambda: spy.widest == 1 + len(others))  # they run beside the long row
            stream.close()
            got = [future.result() for future in futures]
        assert got == [expected[key(request)] for request in others]
        wait_until(lambda: metrics(url)["modes"]["ar"]["cancelled"] == 1)
        assert metrics(url)["modes"]["ar"]["generation_tokens"] < 150 + expected[key(REQUESTS[3])][2]
    assert spy.cancelled == 1 and spy.alone == 0


def test_bad_requests_get_the_one_at_a_time_servers_400(tiny):
    import openai

    with serving(*tiny, decode_concurrency=CONCURRENCY) as url:
        api = client(url)
        for request_options, message in BAD:
            with pytest.raises(openai.BadRequestError) as raised:
                api.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                                               **request_options})
            assert message in raised.value.response.json()["error"]["message"]


NAN = object()  # a forced row's logits are not finite


def forced_rows(monkeypatch, replies):
    """The selector of each batched row whose prompt ids `replies` names forced to write that reply (a logits processor,
    as test_serve_tools forces `stream_generate`), or given NaN logits (NAN)."""
    insert = BatchEngine.insert

    def forced(engine, *args, **kwargs):
        uid = insert(engine, *args, **kwargs)
        row = engine.waiting[-1]
        reply = replies.get(tuple(row.prompt.tolist()))
        if reply is NAN:
            row.select = TokenSelector(processors=[lambda tokens, logits: logits * float("nan")])
        elif reply is not None:
            ids = engine.tokenizer.encode(reply, add_special_tokens=False)
            row.select = TokenSelector(processors=[forcing(ids, row.prompt.size)], history=row.prompt)
        return uid

    monkeypatch.setattr(BatchEngine, "insert", forced)


def queue_together(spy, url, count):
    """Hold the batch's first step until `count` requests have reached the server."""
    wait_until(lambda: spy.held is not None and spy.held + metrics(url)["queued"] == count)
    spy.gate.set()


def test_tool_calls_through_the_batch_streamed_or_not(checkpoints, monkeypatch, spy):  # noqa: F811
    folder, _ = checkpoints
    tokenizer = mlx_dllm.load(str(folder))[1]
    forced_rows(monkeypatch, {tuple(template_ids(tokenizer, ASK, {"tools": TOOLS})): CALLS,
                              tuple(template_ids(tokenizer, ASK)): "Sunny."})
    with serving(folder, decode_concurrency=CONCURRENCY) as url:
        api = client(url)
        spy.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            whole = pool.submit(api.chat.completions.create, model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
            streamed = pool.submit(lambda: list(api.chat.completions.create(
                model="tiny", messages=ASK, tools=TOOLS, max_tokens=200, stream=True)))
            plain = pool.submit(api.chat.completions.create, model="tiny", messages=ASK, max_tokens=50)
            queue_together(spy, url, 3)
            reply, chunks, plain = whole.result(), streamed.result(), plain.result()
    want = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert reply.choices[0].message.content == "Let me check. " and reply.choices[0].finish_reason == "tool_calls"
    assert [call_of(c) for c in reply.choices[0].message.tool_calls] == want
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check. "
    assert [call_of(c) for d in deltas for c in d.tool_calls or ()] == want
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert plain.choices[0].message.content == "Sunny." and plain.choices[0].finish_reason == "stop"
    assert spy.widest == 3 and spy.alone == 0


def test_a_row_whose_logits_are_not_finite_fails_alone(tiny, answers, monkeypatch, spy):
    import openai

    expected, _ = answers
    others = [REQUESTS[0], REQUESTS[3]]
    failing = ("text", dict(prompt=[2, 3], max_tokens=8, extra_body={"mode": "ar"}))
    forced_rows(monkeypatch, {(2, 3): NAN})
    with serving(*tiny, decode_concurrency=CONCURRENCY) as url:
        api = client(url)
        spy.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ask, api, request) for request in [failing, *others]]
            queue_together(spy, url, 3)
            with pytest.raises(openai.BadRequestError) as raised:
                futures[0].result()
            got = [future.result() for future in futures[1:]]
    assert raised.value.response.json()["error"]["message"] == NOT_FINITE_MESSAGE
    assert got == [expected[key(request)] for request in others] and spy.alone == 0


def test_the_multi_turn_replay_reports_each_turn(tiny):
    """benchmarks/serve_load.py --multi-turn: later turns resume the earlier ones' prompt states, one at a time or
    batched."""
    from benchmarks.serve_load import multi_turn

    for concurrency in (1, 2):
        with serving(*tiny, decode_concurrency=concurrency) as url:
            result = multi_turn(url, ["w5 w6", "w7 w8 w9", "w10"], turns=3, chats=2, max_tokens=4, mode="ar",
                                api_key=None)
        assert len(result["ttft_s_per_turn"]) == 3 and all(t > 0 for t in result["ttft_s_per_turn"])
        prompts, cached = result["prompt_tokens_per_turn"], result["cached_tokens_per_turn"]
        assert prompts[0] < prompts[1] < prompts[2]
        assert cached[0] < cached[1] < cached[2]


def test_batched_conversations_resume_their_turns_as_one_at_a_time(tiny, spy):
    """A chat (ar), a completions (dflash) and a completions conversation ended by a stop string (ar: the row the
    server ends there leaves its state) at once through --decode-concurrency 2: turn 2 resumes turn 1's state (cached
    tokens in its usage, streamed or not) and every turn answers what the one-at-a-time server answers."""
    from tests.test_prompt_cache import turns

    conversations = [("chat", MESSAGES, {"mode": "ar"}), ("completions", "w20 w30 w40 w50", {"mode": "dflash"})]

    def talk(url, conversations):
        with ThreadPoolExecutor(len(conversations)) as pool:
            return list(pool.map(lambda conversation: turns(client(url), *conversation), conversations))

    with serving(*tiny) as url:
        alone = talk(url, conversations)
        stop = alone[1][0][0].split()[3]  # the fourth word of the completion's first answer
        conversations.append(("completions", "w20 w30 w40 w50", {"mode": "ar", "stop": [stop]}))
        alone += talk(url, conversations[2:])
    assert stop not in alone[2][0][0]
    spy.alone = 0  # the one-at-a-time server's
    with serving(*tiny, decode_concurrency=2) as url:
        batched = talk(url, conversations)
    assert spy.alone == 0
    for got, expected in zip(batched, alone):
        assert [text for text, _ in got] == [text for text, _ in expected]
        assert [usage.prompt_tokens_details.cached_tokens > 0 for _, usage in got] == [False, True, True]
        assert [usage.prompt_tokens for _, usage in got] == [usage.prompt_tokens for _, usage in expected]


def test_the_soak_loses_nothing_when_clients_leave(tiny):
    """benchmarks/serve_load.py --disconnect: every request completes, errs cleanly or is left by us; the server
    then still answers and every request it took has finished (one at a time and batched)."""
    from benchmarks.serve_load import soak

    for concurrency in (1, 3):
        with serving(*tiny, decode_concurrency=concurrency) as url:
            result = soak(url, ["w5 w6", "w7 w8 w9", "w10"], requests=16, concurrency=4, max_tokens=24, mode=None,
                          api_key=None, disconnect=0.5, seed=1, timeout=60)
        left = sum(result["disconnected"].values())
        assert result["completed"] + sum(result["clean_errors"].values()) + left == 16, result
        assert result["lost"] == 0 and result["healthy"] and result["unfinished_after"] == 0, result
        assert left > 0 and result["completed"] > 0, result


def test_the_cli_flag_reaches_the_server(tiny, monkeypatch):
    from tests.test_cli import run

    folder, _ = tiny
    built = []

    class Worker:
        def stop(self):
            pass

    def build(load, settings, max_queue):  # no model loads: only the settings matter
        built.append(settings)
        return None, Worker()

    monkeypatch.setattr("mlx_dllm.server.run.build", build)
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: None)
    assert run("serve", "--model", folder, "--port", 0, "--decode-concurrency", 3).exit_code == 0
    assert run("serve", "--model", folder, "--port", 0).exit_code == 0
    assert [settings.decode_concurrency for settings in built] == [3, 1]
    refused = run("serve", "--model", folder, "--port", 0, "--decode-concurrency", 0)
    assert refused.exit_code == 2 and "--decode-concurrency" in refused.stderr
