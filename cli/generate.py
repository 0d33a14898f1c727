"""`mlx-dllm generate`: flags follow `mlx_lm.generate`; ends with mlx-lm's summary lines plus our stats."""

import json
import sys
from typing import List

import click
import mlx.core as mx
import mlx_dllm
from mlx_dllm import blas
from mlx_dllm.chat_template import template_ids
from mlx_dllm.default_model import NAME, default_drafter, names_default
from mlx_dllm.errors import DLLMError
from mlx_dllm.loading import load_pair
from mlx_dllm.output import echo
from mlx_dllm.sampler import summary
from mlx_dllm.sampler.arguments import SEED_LIMIT, stop_strings, whole_number
from mlx_dllm.sampler.common import check_sampling
from mlx_dllm.sampler.dflash import BLOCK_SIZE, block_size_option
from mlx_dllm.sampler.mode import all_modes, served_options, takers

from .visualize import CanvasView

DEFAULT_PROMPT = "hello"


class Text(click.ParamType):
    """Text that must be UTF-8: Python hands undecodable bytes of an argument over as lone surrogates, which no
    tokenizer, template or JSON value takes, so they are refused here, by flag."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            byte = ord(value[error.start]) & 0xFF  # surrogateescape: byte 0xNN became U+DCNN
            self.fail(f"not UTF-8 text (byte 0x{byte:02x})", param, ctx)
        return value


TEXT = Text()


def read_prompt(prompt: str) -> str:
    """The -p text with mlx-lm's escapes, or stdin for '-' (which must be UTF-8); never empty."""
    prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as error:
            raise DLLMError(f"the prompt read from stdin is not UTF-8 text (byte {error.start})") from error
        if not prompt:
            raise DLLMError("the prompt is empty: -p - read nothing from stdin")
    if not prompt:
        raise DLLMError("the prompt is empty: give some text with -p")
    return prompt


def check_values(max_tokens, prefill_step_size, seed, stop, temp, top_p, top_k, min_p, block_size, num_draft_tokens):
    """The values that need no model, by the sampler's own rules, before any model is resolved or loaded."""
    whole_number("max_tokens", max_tokens, 1)
    whole_number("prefill_step_size", prefill_step_size, 1)
    if seed is not None:
        whole_number("seed", seed, 0, SEED_LIMIT - 1)
    stop_strings(stop)
    check_sampling(temp, top_p, top_k, min_p)
    block_size = block_size_option(block_size, num_draft_tokens)
    if block_size is not None:  # whether DFlash runs at all is the model's to say
        BLOCK_SIZE.check(block_size)


def template_options(chat_template_config) -> dict:
    if chat_template_config is None:
        return {}
    try:
        options = json.loads(chat_template_config)
    except json.JSONDecodeError as error:
        raise DLLMError(f"--chat-template-config is not valid JSON: {error.msg}") from error
    if not isinstance(options, dict):
        raise DLLMError("--chat-template-config must be a JSON object")
    return options


def build_prompt(tokenizer, prompt: str, system_prompt, ignore_chat_template: bool, options=None) -> List[int]:
    """The prompt's ids as `mlx_lm.generate` makes them: the chat template when there is one and it is wanted,
    else the text with special tokens."""
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt, add_special_tokens=True)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return template_ids(tokenizer, messages + [{"role": "user", "content": prompt}], options)




def choose_drafter(model, draft_model, no_draft: bool, mode):
    """The default model (no --model, or named) decodes with its shipped drafter unless told otherwise (--no-draft,
    'none', a mode); a drafter named beside --no-draft is a contradiction, not a choice."""
    no_drafter = draft_model is not None and draft_model.lower() == "none"
    if no_draft and draft_model is not None and not no_drafter:
        raise DLLMError(f"--no-draft and --draft-model {draft_model} contradict each other: give one")
    if no_draft or no_drafter:
        return None
    if draft_model is None and (model is None or names_default(model)) and mode in (None, "dflash"):
        return default_drafter()
    return draft_model


def mode_options(command):
    """A flag per option the modes declare (a switch that is on by default: --no-NAME), in their order."""
    for option in reversed(served_options()):
        if option.name == BLOCK_SIZE.name:
            continue  # beside --num-draft-tokens, above
        where = "/".join(takers(option))
        if option.kind is bool:
            flag = click.option(option.cli_flag, option.name, flag_value=False, default=None,
                                help=f"{where}: turn off: {option.help}.")
        else:
            kind = click.Choice(option.choices) if option.kind is str else option.kind
            flag = click.option(option.cli_flag, type=kind, default=None, help=f"{where}: {option.help}.")
        command = flag(command)
    return command


@click.command("generate")
@click.option(
    "--model",
    default=None,
    help="MLX target model folder or hub repo id (default, or 'default': SmolLM2-135M-Instruct, from the hub or "
    "PyPI).",
)
@click.option(
    "--draft-model",
    default=None,
    help="DFlash drafter folder or hub repo id (default model: its shipped drafter; 'none': plain AR).",
)
@click.option("--no-draft", is_flag=True, help="No drafter, not even the default model's: plain AR.")
@click.option("--block-size", type=int, default=None, help=f"dflash: {BLOCK_SIZE.help}.")
@click.option(
    "--num-draft-tokens", type=int, default=None, help="Tokens to draft per block, as mlx-lm (= --block-size - 1)."
)
@click.option(
    "-p", "--prompt", type=TEXT, default=DEFAULT_PROMPT, show_default=True, help="Prompt text; '-' reads stdin."
)
@click.option("-m", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Sampling top-p.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sampling top-k (0: off).")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="Sampling min-p.")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--system-prompt", type=TEXT, default=None, help="System prompt for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as is.")
@click.option(
    "--chat-template-config",
    type=TEXT,
    default=None,
    help='JSON object of extra chat-template arguments, e.g. \'{"enable_thinking": false}\'.',
)
@click.option(
    "--verbose",
    type=click.BOOL,
    default=True,
    is_flag=False,
    flag_value=True,
    show_default=True,
    help="Print rulers and the summary ('--verbose False' as in mlx-lm, or --no-verbose).",
)
@click.option("--no-verbose", "quiet", is_flag=True, help="Print the generated text only.")
@click.option("--prefill-step-size", type=int, default=2048, show_default=True, help="Prompt tokens per prefill chunk.")
@click.option("--stop", type=TEXT, multiple=True, help="Stop at this text (repeatable).")
@click.option("--image", multiple=True, help="Image input (not supported yet).")
@click.option("--visualize", is_flag=True, help="diffusion: redraw the canvas at every step.")
@click.option(
    "--mode",
    default=None,
    help=f"Decoding mode, as the model supports: {', '.join(dict.fromkeys(m.name for m in all_modes()))} (default: "
    "the model's own).",
)
@mode_options
def generate_command(
    model,
    draft_model,
    no_draft,
    block_size,
    num_draft_tokens,
    prompt,
    max_tokens,
    temp,
    top_p,
    top_k,
    min_p,
    seed,
    system_prompt,
    ignore_chat_template,
    chat_template_config,
    verbose,
    quiet,
    prefill_step_size,
    stop,
    image,
    visualize,
    mode,
    **knobs,
):
    """Generate text: plain AR, DFlash with --draft-model, or a diffusion model's own modes."""
    if image:
        raise DLLMError("image input is not supported yet")
    check_values(max_tokens, prefill_step_size, seed, stop, temp, top_p, top_k, min_p, block_size, num_draft_tokens)
    verbose = verbose and not quiet
    chat_options = template_options(chat_template_config)
    draft_model = choose_drafter(model, draft_model, no_draft, mode)
    text = read_prompt(prompt)
    target, tokenizer, drafter = load_pair(model if model is not None else NAME, draft_model)
    prompt = build_prompt(tokenizer, text, system_prompt, ignore_chat_template, chat_options)
    options = {k: v for k, v in knobs.items() if v is not None}
    view = CanvasView(tokenizer) if visualize else None
    if view is not None:
        options["on_step"] = view
    responses = mlx_dllm.stream_generate(
        target,
        tokenizer,
        prompt,
        max_tokens,
        draft_model=drafter,
        mode=mode,
        block_size=block_size,
        num_draft_tokens=num_draft_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop=stop,
        prefill_step_size=prefill_step_size,
        **options,
    )
    response = None
    for index, response in enumerate(responses):
        if view is not None:
            view.clear()
        if verbose and index == 0:
            echo("=" * 10)  # after the first response: a bad flag fails before anything is printed
            if view is not None:
                view.committed("\n")
        echo(response.text, nl=False)
        if view is not None:
            view.committed(response.text)
    echo()
    if verbose and response is not None:
        echo("=" * 10)
        echo(summary(response))
        # The BLAS the speeds above ran on; stderr, since stdout carries the text and the summary only.
        click.echo(f"[INFO] BLAS: {blas.current_blas()}, device {mx.default_device()}", err=True)
