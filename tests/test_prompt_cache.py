"""Prompt-cache reuse (sampler/prompt_cache.py): a call that resumes an earlier call's state generates what a cold call
generates, in every mode, on K/V, sliding-window and recurrent targets; the cache keeps to its limits and its keys."""

import json
import urllib.request

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

import mlx_dllm
from mlx_dllm import DLLMError, stream_generate
from mlx_dllm.benchmark.tiny import build_tiny, save_tokenizer
from mlx_dllm.chat_template import template_ids
from mlx_dllm.sampler import dflash as dflash_strategy
from mlx_dllm.sampler.prompt_cache import PromptCache
from tests.oracle import Oracle
from tests.test_cli import assert_user_error
from tests.test_cli import run as run_cli
from tests.test_serve import CASES, MESSAGES, add_chat_template, client, serving
from tests.test_target_families import VOCAB, make_drafter, make_target
from tests.test_tree_dflash import FLAT, machine, run

TARGETS = {"kv": "qwen3", "sliding": "llama", "recurrent": "nemotron_h"}
PROMPT = [5, 17, 42, 9, 3, 11, 60, 23, 7, 90, 31, 4]  # longer than the sliding window (8 rows)
FOLLOW_UP = [44, 12, 8]  # the next user turn
MAX_TOKENS = 10
SAMPLED = {"temp": 0.8, "seed": 3}
DFLASH = [{"speculation": "chain"}, {"speculation": "chain", **SAMPLED}, {"speculation": "auto"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    wrapped = load_tokenizer(folder)
    wrapped.eos_token_ids = []  # every call runs to max_tokens
    return wrapped


def record_drafts(monkeypatch):
    """Per call (each binds its own Target), the hidden states of its drafter forwards: equal only where the drafter
    read the same context rows."""
    calls, draft_hidden = [], dflash_strategy.draft_hidden

    def recording(draft, target, *args):
        hidden = draft_hidden(draft, target, *args)
        if not calls or calls[-1][0] is not target:
            calls.append((target, []))
        calls[-1][1].append(np.array(hidden))
        return hidden

    monkeypatch.setattr(dflash_strategy, "draft_hidden", recording)
    return calls


def same_drafts(drafts) -> None:
    """The last three calls (a conversation's warm, cold and repeated turn 2) ran the drafter on the same rows."""
    warm, cold, repeat = (hidden for _, hidden in drafts[-3:])
    assert len(warm) == len(cold) == len(repeat)
    for warm_rows, cold_rows, repeat_rows in zip(warm, cold, repeat):
        np.testing.assert_allclose(warm_rows, cold_rows, atol=1e-4)
        np.testing.assert_allclose(repeat_rows, cold_rows, atol=1e-4)


def conversation(model, tokenizer, cache, chunks=None, **options):
    """Turn 1 with `cache` (read whole, or its first `chunks` responses only: a client that leaves), then turn 2
    (turn 1's prompt + answer + new user text) with it and cold, then turn 2 again with it: (turn 1's tokens,
    [(tokens, last response)] of warm turn 2, cold turn 2, warm repeat)."""
    responses = stream_generate(model, tokenizer, PROMPT, MAX_TOKENS, prompt_cache=cache, **options)
    read = [response for _, response in zip(range(chunks or MAX_TOKENS), responses)]
    responses.close()
    first = [token for response in read for token in response.tokens]
    assert read[-1].cached_tokens == 0
    second = PROMPT + first + FOLLOW_UP
    turns = [run(model, tokenizer, second, MAX_TOKENS, prompt_cache=cache, **options),
             run(model, tokenizer, second, MAX_TOKENS, **options),
             run(model, tokenizer, second, MAX_TOKENS, prompt_cache=cache, **options)]
    return first, turns


@pytest.mark.parametrize("options", [{}, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", TARGETS)
def test_ar_resumes_and_generates_what_a_cold_call_does(tokenizer, kind, options):
    first, (warm, cold, repeat) = conversation(make_target(TARGETS[kind]), tokenizer, PromptCache(), mode="ar",
                                               **options)
    assert warm[0] == cold[0] == repeat[0]
    assert warm[1].cached_tokens == len(PROMPT) + len(first)  # the whole of turn 1: its prompt and answer
    assert cold[1].cached_tokens == 0 and repeat[1].cached_tokens >= len(PROMPT) + len(first)


@pytest.mark.parametrize("options", DFLASH, ids=["chain", "sampled-chain", "auto"])
@pytest.mark.parametrize("kind", TARGETS)
def test_dflash_resumes_and_its_drafter_reads_what_a_cold_call_reads(tokenizer, monkeypatch, kind, options):
    """Auto on these random drafters mixes AR steps (whose rows wait for the drafter) with chains and trees."""
    machine(monkeypatch, FLAT)
    drafts = record_drafts(monkeypatch)
    model, draft = make_target(TARGETS[kind]), make_drafter()
    first, (warm, cold, repeat) = conversation(model, tokenizer, PromptCache(), mode="dflash", draft_model=draft,
                                               **options)
    assert warm[0] == cold[0] == repeat[0]
    # Turn 1 left its prompt's and its generation's states; the target held its tokens but the last anchor (or all).
    assert warm[1].cached_tokens >= len(PROMPT) + len(first) - 1 and repeat[1].cached_tokens >= len(PROMPT)
    assert warm[1].acceptance_length == cold[1].acceptance_length and warm[1].speculation == cold[1].speculation
    same_drafts(drafts)


@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", TARGETS)
def test_dflash_stopped_early_leaves_its_state_where_it_stopped(tokenizer, monkeypatch, kind, chunks):
    """A client that leaves after a few chunks: auto's last round may have queued an AR step, which fed the anchor to
    the target and holds rows back for the drafter, or a drafter forward that read them all."""
    machine(monkeypatch, FLAT)
    drafts = record_drafts(monkeypatch)
    model, draft = make_target(TARGETS[kind]), make_drafter()
    first, (warm, cold, repeat) = conversation(model, tokenizer, PromptCache(), chunks, draft_model=draft)
    assert warm[0] == cold[0] == repeat[0]
    assert warm[1].cached_tokens >= len(PROMPT) + len(first) - 1
    same_drafts(drafts)


@pytest.mark.parametrize("max_tokens", [4, 7])
def test_a_last_round_cut_at_max_tokens_leaves_what_its_target_holds(tokenizer, monkeypatch, max_tokens):
    """Every draft right: each round accepts its whole block of 4, so the last one commits a token past max_tokens,
    which is cut, while the target keeps the row of the last token emitted. The state left holds it (all of turn 1),
    and turn 2 resumes it and answers as cold."""
    model, draft = make_target("qwen3"), make_drafter()
    reference = run(model, tokenizer, PROMPT, max_tokens, mode="ar")[0]
    propose_block = dflash_strategy.propose_block
    monkeypatch.setattr(dflash_strategy, "propose_block", Oracle(propose_block, reference, len(PROMPT), [7], VOCAB))
    cache, chain = PromptCache(), {"draft_model": draft, "speculation": "chain"}
    first, response = run(model, tokenizer, PROMPT, max_tokens, block_size=4, prompt_cache=cache, **chain)
    assert first == reference and response.acceptance_length > 2
    monkeypatch.setattr(dflash_strategy, "propose_block", propose_block)
    second = PROMPT + first + FOLLOW_UP
    warm, cold = run(model, tokenizer, second, MAX_TOKENS, prompt_cache=cache, **chain), \
        run(model, tokenizer, second, MAX_TOKENS, **chain)
    assert warm[0] == cold[0] and warm[1].cached_tokens == len(PROMPT) + len(first)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (model, tokenizer) of its tiny checkpoint."""
    return {family: mlx_dllm.load(str(build_tiny(family, tmp_path_factory.mktemp(family))[0]))
            for family in ("nemotron", "diffusion-gemma")}


NEMOTRON = [{"mode": "linear-spec"}, {"mode": "quadratic-spec"}, {"mode": "diffusion"},
            {"mode": "linear-spec", **SAMPLED}]


@pytest.mark.parametrize("chunks", [None, 2], ids=["whole", "stopped-early"])
@pytest.mark.parametrize("family, options", [*(("nemotron", o) for o in NEMOTRON),
                                             ("diffusion-gemma", {"mode": "diffusion", "seed": 5})])
def test_self_speculation_and_diffusion_resume_as_well(tiny, family, options, chunks):
    """Stopped early, a self-speculating mode has queued its next cycle, which the state it leaves must not hold."""
    model, tokenizer = tiny[family]
    first, (warm, cold, repeat) = conversation(model, tokenizer, PromptCache(), chunks, **options)
    assert warm[0] == cold[0] == repeat[0]
    assert warm[1].cached_tokens >= len(PROMPT) and repeat[1].cached_tokens >= len(PROMPT)


def test_a_bidirectional_prompt_is_never_resumed(tiny):
    model, tokenizer = tiny["nemotron"]
    first, (warm, cold, _) = conversation(model, tokenizer, PromptCache(), mode="diffusion", causal_context=False)
    assert warm[0] == cold[0] and warm[1].cached_tokens == 0


def test_the_byte_limit_evicts_the_least_recent_state(tokenizer):
    model = make_target("qwen3")
    unlimited = PromptCache()
    run(model, tokenizer, PROMPT, MAX_TOKENS, mode="ar", prompt_cache=unlimited)
    one_state = unlimited.nbytes  # a K/V state keeps one entry: its prompt's is a prefix it trims back to
    assert len(unlimited) == 1 and one_state > 0
    limited = PromptCache(max_bytes=one_state)
    other = [6] + PROMPT[1:]
    for prompt in (PROMPT, other):
        run(model, tokenizer, prompt, MAX_TOKENS, mode="ar", prompt_cache=limited)
        assert len(limited) == 1 and limited.nbytes <= one_state
    assert run(model, tokenizer, other, 2, mode="ar", prompt_cache=limited)[1].cached_tokens > 0
    assert run(model, tokenizer, PROMPT, 2, mode="ar", prompt_cache=limited)[1].cached_tokens == 0  # evicted


def test_another_model_drafter_or_mode_never_matches(tokenizer, monkeypatch):
    machine(monkeypatch, FLAT)
    model, draft = make_target("qwen3"), make_drafter()
    cache = PromptCache()
    run(model, tokenizer, PROMPT, MAX_TOKENS, mode="dflash", draft_model=draft, prompt_cache=cache)
    follow_up = PROMPT + FOLLOW_UP
    others = ({"model": make_target("qwen3")}, {"draft_model": make_drafter()}, {"mode": "ar", "draft_model": None})
    for other in others:  # the same weights in another object, another drafter, another mode
        call = {"model": model, "mode": "dflash", "draft_model": draft, **other}
        assert run(call.pop("model"), tokenizer, follow_up, 2, prompt_cache=cache, **call)[1].cached_tokens == 0
    resumed = run(model, tokenizer, follow_up, 2, mode="dflash", draft_model=draft, prompt_cache=cache)[1]
    assert resumed.cached_tokens == len(PROMPT)
    with pytest.raises(DLLMError, match="prompt_cache must be a PromptCache, got dict"):
        next(stream_generate(model, tokenizer, PROMPT, 2, prompt_cache={}))


def test_a_failed_call_leaves_nothing(tokenizer, monkeypatch):
    """A generation that fails mid-way (here its logits are not finite) stores no state, not even its prompt's."""
    model = make_target("nemotron_h")
    cache = PromptCache()
    calls = iter(range(1000))
    forward = type(model).__call__

    def failing(self, *args, **kwargs):
        logits = forward(self, *args, **kwargs)
        return logits * float("nan") if next(calls) == 3 else logits

    monkeypatch.setattr(type(model), "__call__", failing)
    with pytest.raises(DLLMError, match="not finite"):
        run(model, tokenizer, PROMPT, MAX_TOKENS, mode="ar", prompt_cache=cache)
    assert len(cache) == 0


def turns(api, route, first_turn, options, max_tokens=8):
    """Turn 1, then turn 2 (turn 1 + its answer + new user text), non-streamed and streamed: [(text, usage)]."""
    def ask(turn, stream=False):
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        if route == "chat":
            reply = api.chat.completions.create(model="tiny", messages=turn, max_tokens=max_tokens,
                                                extra_body=options, **extra)
            if stream:
                chunks = list(reply)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
            return reply.choices[0].message.content, reply.usage
        reply = api.completions.create(model="tiny", prompt=turn, max_tokens=max_tokens, extra_body=options, **extra)
        if stream:
            chunks = list(reply)
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage
        return reply.choices[0].text, reply.usage

    answer, usage = ask(first_turn)
    if route == "chat":
        second_turn = first_turn + [{"role": "assistant", "content": answer}, {"role": "user", "content": "w8 w9"}]
    else:
        second_turn = f"{first_turn} {answer} w8 w9"
    return [(answer, usage), ask(second_turn), ask(second_turn, stream=True)]


@pytest.mark.parametrize("route, options", [("chat", {"mode": "ar"}), ("completions", {"mode": "dflash"})])
def test_a_server_conversation_reports_cached_tokens_and_answers_as_a_cold_server(tmp_path, route, options):
    assert options in CASES["dflash"]  # test_serve checks these answers against generate
    folder, draft = build_tiny("dflash", tmp_path)
    add_chat_template(folder)
    first_turn = MESSAGES if route == "chat" else "w20 w30 w40 w50"
    with serving(folder, draft) as url:
        warm = turns(client(url), route, first_turn, options)
        metrics = json.loads(urllib.request.urlopen(url.replace("/v1", "/metrics")).read())
    with serving(folder, draft, prompt_cache_size=0) as url:
        cold = turns(client(url), route, first_turn, options)
    assert [text for text, _ in warm] == [text for text, _ in cold]
    assert warm[0][1].prompt_tokens_details.cached_tokens == 0
    for _, usage in warm[1:]:
        assert usage.prompt_tokens_details.cached_tokens > 0
    assert all(usage.prompt_tokens_details.cached_tokens == 0 for _, usage in cold)
    assert metrics["modes"][options["mode"]]["cached_tokens"] > 0
    if route == "chat":  # turn 2 has all of turn 1's prompt but its last token: the K/V state trims back to it
        tokenizer = mlx_dllm.load(str(folder))[1]
        assert warm[1][1].prompt_tokens_details.cached_tokens < len(template_ids(tokenizer, MESSAGES))



def test_serve_takes_the_cache_flags_as_mlx_lm_server_spells_them(monkeypatch):
    given = []

    def build(load, settings, max_queue):
        given.append(settings)
        raise DLLMError("stopped before loading")

    monkeypatch.setattr("mlx_dllm.server.run.build", build)
    assert_user_error(run_cli("serve", "--model", "m", "--port", 0, "--prompt-cache-size", 3, "--prompt-cache-bytes",
                              "1.5GB"), "stopped before loading")
    assert (given[0].prompt_cache_size, given[0].prompt_cache_bytes) == (3, 1_500_000_000)
    assert_user_error(run_cli("serve", "--prompt-cache-bytes", "8XB"), "'8XB' is not a size such as 500000")
    assert_user_error(run_cli("serve", "--prompt-cache-size", -1), "--prompt-cache-size")
