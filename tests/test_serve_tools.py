"""`mlx-dllm serve`'s tool calls and mlx_lm.server's habits (no-template prompt, /v1/models names,
chat_template_kwargs), through the real `openai` client.

The tiny model has a byte-level tokenizer whose chat template renders tools in the `<tool_call>` JSON format that
mlx-lm recognises. A random model writes no tool call by itself, so a logits processor forces each reply's tokens
(the server's generation still runs the model, the detokenizer and the server's own parsing).
"""

import copy
import json

import mlx.core as mx
import pytest
from mlx_lm.server import convert_chat, process_message_content

import mlx_dllm
from mlx_dllm.benchmark.tiny import save_checkpoint, tiny_family
from mlx_dllm.chat_template import render, template_ids
from mlx_dllm.default_model import HUB_REPO
from mlx_dllm.models.family import TINY_EOS_TOKEN_ID
from mlx_dllm.server.run import model_names
from tests.test_serve import client, raw_post, serving

# Qwen2.5's way of writing calls (`tool_call.name` beside `<tool_call>`), so mlx-lm picks its json_tools parser.
TEMPLATE = (
    '{%- if tools %}system: call a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call> from'
    "{%- for tool in tools %} {{ tool | tojson }}{%- endfor %}\n{% endif %}"
    "{%- for m in messages %}{{ m.role }}:{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %} {{ m.content }}"
    "{%- for call in m.tool_calls or [] %}{%- set tool_call = call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{%- endfor %}\n{% endfor %}"
    "{%- if brief %}system: be brief\n{% endif %}assistant:"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris and Rome?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
CALLS = "Let me check. " + CALL % "Paris" + CALL % "Rome"


def save_tool_checkpoint(folder, template):
    """The tiny Qwen3 target with a byte-level BPE tokenizer (every text encodes) and the tool-call markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": TINY_EOS_TOKEN_ID, **{byte: 2 + i for i, byte in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")
    fast.add_tokens(["<tool_call>", "</tool_call>"])
    if template is not None:
        fast.chat_template = template
    save_checkpoint({**tiny_family("dflash").tiny.target, "vocab_size": len(fast)}, folder, seed=0, tokenizer=False)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(with the tool template, without any chat template)."""
    root = tmp_path_factory.mktemp("tools")
    return save_tool_checkpoint(root / "tools", TEMPLATE), save_tool_checkpoint(root / "plain", None)


class Script:
    """The replies the server's next generations write (one per request) and the prompts they got."""

    def __init__(self):
        self.replies, self.prompts = [], []


def forcing(ids, prompt_size):
    """A logits processor that makes greedy AR write `ids`, then the end of sequence."""

    def force(tokens, logits):
        step = tokens.size - prompt_size
        target = ids[step] if step < len(ids) else TINY_EOS_TOKEN_ID
        return mx.where(mx.arange(logits.shape[-1]) == target, logits, -mx.inf)

    return force


@pytest.fixture
def script(monkeypatch):
    original = mlx_dllm.stream_generate
    scripted = Script()

    def scripted_generate(model, tokenizer, prompt, *args, **kwargs):
        scripted.prompts.append(list(prompt))
        ids = tokenizer.encode(scripted.replies.pop(0), add_special_tokens=False)
        return original(model, tokenizer, prompt, *args, logits_processors=[forcing(ids, len(prompt))], **kwargs)

    monkeypatch.setattr(mlx_dllm, "stream_generate", scripted_generate)
    return scripted


def call_of(tool_call):
    return tool_call.function.name, json.loads(tool_call.function.arguments)


def test_tool_calls_streamed_or_not_are_the_same_openai_tool_calls(checkpoints, script):
    folder, _ = checkpoints
    tokenizer = mlx_dllm.load(str(folder))[1]
    assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"
    script.replies = [CALLS, CALLS]
    with serving(folder) as url:
        api = client(url)
        reply = api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
        chunks = list(api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                                  stream=True))
    want = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    message = reply.choices[0].message
    assert message.content == "Let me check. " and reply.choices[0].finish_reason == "tool_calls"
    assert [call_of(c) for c in message.tool_calls] == want
    assert all(c.type == "function" and c.id for c in message.tool_calls)
    assert len({c.id for c in message.tool_calls}) == 2
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check. "  # nothing between the markers
    streamed = [call for d in deltas for call in d.tool_calls or ()]
    assert [call_of(c) for c in streamed] == want and [c.index for c in streamed] == [0, 1]
    assert all(c.type == "function" and c.id for c in streamed)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert script.prompts == [template_ids(tokenizer, ASK, {"tools": TOOLS})] * 2
    assert json.dumps(TOOLS[0]) in render(tokenizer, ASK, {"tools": TOOLS})


def test_the_tool_result_turn_renders_as_mlx_lm_renders_it_and_the_next_request_answers(checkpoints, script):
    folder, _ = checkpoints
    tokenizer = mlx_dllm.load(str(folder))[1]
    script.replies = [CALL % "Paris", "It is 18 C in Paris.", "Still 18 C."]
    with serving(folder) as url:
        api = client(url)
        called = api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
        call = called.choices[0].message.tool_calls[0]
        function = {"name": "get_weather", "arguments": call.function.arguments}
        history = [*ASK, {"role": "assistant", "content": None,
                          "tool_calls": [{"id": call.id, "type": "function", "function": function}]},
                   {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
        answer = api.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=200)
        # The client's own message object goes back as it serialises it.
        again = api.chat.completions.create(model="tiny", messages=[*ASK, called.choices[0].message, history[-1]],
                                            tools=TOOLS, max_tokens=200)
    assert answer.choices[0].message.content == "It is 18 C in Paris." and answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason == "stop" and again.choices[0].message.content == "Still 18 C."
    # mlx_lm.server's rendering of the same messages: its content handling, then the template with the tools.
    messages = copy.deepcopy(history)
    process_message_content(messages)
    want = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    assert script.prompts[1] == script.prompts[2] == list(want)
    text = tokenizer.decode(want)
    assert CALL % "Paris" in text
    assert f"tool: ({call.id}) 18 C" in text


def test_tool_choice_none_returns_the_text_and_named_or_required_parse(checkpoints, script):
    folder, _ = checkpoints
    script.replies = [CALLS, CALLS, CALL % "Oslo"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    with serving(folder) as url:
        api = client(url)
        plain = api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                            max_tokens=200)
        required = api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, max_tokens=200)
        chosen = api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named,
                                             max_tokens=200)
    assert plain.choices[0].message.content == CALLS and plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason == "stop"
    assert len(required.choices[0].message.tool_calls) == 2  # as mlx_lm.server: the model is not constrained
    assert [call_of(c) for c in chosen.choices[0].message.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert chosen.choices[0].message.content is None


def call_message(**call):
    return [*ASK, {"role": "assistant", "tool_calls": [call]}]


BAD_TOOLS = [
    (dict(tools="get_weather"), "tools must be a list of {type: function, function: {...}} objects"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0] must be an object with type 'function' and a function object"),
    (dict(tools=[{"type": "function", "function": {"description": "x"}}]), "tools[0].function needs a name"),
    (dict(tools=[{**TOOLS[0], "cache": True}]), "tools[0].cache is not supported"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be auto, none, required or"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}),
     "tool_choice names the function 'get_time', which is not in tools"),
    (dict(tool_choice="required"), "tool_choice required needs tools"),
    (dict(tools=TOOLS, parallel_tool_calls="yes"), "parallel_tool_calls must be true or false, got 'yes'"),
    (dict(messages=call_message(id="c1", type="function", function={"name": "get_weather", "arguments": "{oops"})),
     "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    (dict(messages=call_message(function={"name": "get_weather"}, extra=1)),
     "messages[1].tool_calls[0].extra is not supported"),
    (dict(messages=[{"role": "user", "content": "hi", "tool_calls": []}]),
     "messages[0].tool_calls is not supported in a user message"),
    (dict(messages=[{"role": "tool", "content": "18 C", "tool_call_id": 7}]),
     "messages[0].tool_call_id must be a string"),
    (dict(messages=[{"role": "assistant", "content": "hi", "refusal": "no"}]),
     "messages[0].refusal is not supported"),
]


def test_bad_tools_and_tool_messages_get_400_with_one_line(checkpoints):
    folder, _ = checkpoints
    with serving(folder) as url:
        for fields, message in BAD_TOOLS:
            status, body = raw_post(url, json.dumps({"messages": ASK, "max_tokens": 2, **fields}).encode())
            assert status == 400 and message in body["error"]["message"], (fields, body)
            assert "\n" not in body["error"]["message"]


def test_a_model_without_a_chat_template_gets_mlx_lm_servers_role_mapping_prompt(checkpoints, script):
    _, folder = checkpoints
    tokenizer = mlx_dllm.load(str(folder))[1]
    assert not tokenizer.has_chat_template
    messages = [{"role": "system", "content": "Be kind."}, *ASK, {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": "And tomorrow?"}]
    mapping = {"user": "Q: ", "assistant": "A: ", "stop": "\n"}
    script.replies = ["Rain.", "Rain."]
    with serving(folder) as url:
        api = client(url)
        assert api.chat.completions.create(model="tiny", messages=messages, max_tokens=20).choices[0].message.content \
            == "Rain."
        api.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                    extra_body={"role_mapping": mapping})
        status, body = raw_post(url, json.dumps({"messages": ASK, "tools": TOOLS}).encode())
    assert script.prompts == [tokenizer.encode(convert_chat(m, r)) for m, r in ((messages, None), (messages, mapping))]
    assert status == 400 and body["error"]["message"] == \
        "tools need a chat template to reach the model, and the model has none"


def test_chat_template_kwargs_reach_the_template(checkpoints, script):
    folder, _ = checkpoints
    tokenizer = mlx_dllm.load(str(folder))[1]
    script.replies = ["Yes.", "Yes."]
    with serving(folder) as url:
        api = client(url)
        for options in ({"brief": True}, None):
            api.chat.completions.create(model="tiny", messages=ASK, max_tokens=5,
                                        extra_body={"chat_template_kwargs": options} if options else {})
    assert script.prompts == [template_ids(tokenizer, ASK, {"brief": True}), template_ids(tokenizer, ASK)]
    assert script.prompts[0] != script.prompts[1]


def test_models_lists_every_name_of_the_served_model(checkpoints, monkeypatch):
    folder, _ = checkpoints
    monkeypatch.chdir(folder.parent)
    assert model_names(f"./{folder.name}") == [f"./{folder.name}", str(folder.resolve()), folder.name]
    assert model_names(folder.name) == [folder.name, str(folder.resolve())]
    assert model_names(str(folder.resolve())) == [str(folder.resolve()), folder.name]
    assert model_names("default") == model_names(HUB_REPO) == ["SmolLM2-135M-Instruct", "default", HUB_REPO]
    assert model_names("someone/model") == ["someone/model"]
    names = model_names(f"./{folder.name}")
    with serving(folder, names=names) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == names
        assert api.chat.completions.create(model=folder.name, messages=ASK, max_tokens=2).model == names[0]
