"""`mlx-dllm generate`: flags follow `mlx_lm.generate`; ends with mlx-lm's summary lines plus our stats."""

import sys

import click

import mlx_dllm
from mlx_dllm.errors import DLLMError
from mlx_dllm.sampler import summary

from .visualize import CanvasView

DEFAULT_PROMPT = "hello"


def build_prompt(tokenizer, prompt: str, system_prompt, ignore_chat_template: bool):
    """The prompt, wrapped in the chat template when there is one and it is wanted."""
    if ignore_chat_template or not tokenizer.has_chat_template:
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    template_options = {}
    # Qwen3-style templates think by default; only pass the switch to templates that know it.
    if "enable_thinking" in str(tokenizer.chat_template):
        template_options["enable_thinking"] = False
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_options)


def end_think_id(tokenizer) -> int:
    token = tokenizer.convert_tokens_to_ids("</think>")
    if not isinstance(token, int) or token == tokenizer.unk_token_id:
        raise DLLMError("--max-thinking-tokens needs a tokenizer with a </think> token")
    return token


def load_models(model_path: str, draft_path):
    model, tokenizer = mlx_dllm.load(model_path)
    if tokenizer is None:
        raise DLLMError(f"{model_path} has no tokenizer")
    draft_model = mlx_dllm.load(draft_path)[0] if draft_path is not None else None  # the target's tokenizer serves both
    return model, tokenizer, draft_model


@click.command("generate")
@click.option("--model", required=True, help="MLX target model folder or hub repo id.")
@click.option("--draft-model", default=None, help="DFlash drafter folder or hub repo id.")
@click.option("--block-size", type=int, default=None, help="Draft block size (default: the drafter's).")
@click.option(
    "--num-draft-tokens", type=int, default=None, help="Tokens to draft per block, as mlx-lm (= --block-size - 1)."
)
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True, help="Prompt text; '-' reads stdin.")
@click.option("-m", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Sampling top-p.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sampling top-k (0: off).")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="Sampling min-p.")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--system-prompt", default=None, help="System prompt for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as is.")
@click.option("--verbose/--no-verbose", default=True, show_default=True, help="Print rulers and the summary.")
@click.option("--prefill-step-size", type=int, default=2048, show_default=True, help="Prompt tokens per prefill chunk.")
@click.option("--stop", multiple=True, help="Stop at this text (repeatable).")
@click.option("--image", multiple=True, help="Image input (not supported yet).")
@click.option("--max-denoising-steps", type=int, default=None, help="Diffusion: steps per canvas at most.")
@click.option("--entropy-bound", type=float, default=None, help="Diffusion: entropy budget of accepted tokens.")
@click.option("--t-min", type=float, default=None, help="Diffusion: temperature at the last step.")
@click.option("--t-max", type=float, default=None, help="Diffusion: temperature at the first step.")
@click.option("--stability-threshold", type=int, default=None, help="Diffusion: steps the argmax must hold.")
@click.option("--confidence-threshold", type=float, default=None, help="Diffusion: mean entropy to stop under.")
@click.option("--visualize", is_flag=True, help="Diffusion: redraw the canvas at every step.")
@click.option(
    "--mode",
    default=None,
    help="Decoding mode (default: the model's own; Nemotron-Labs-Diffusion: "
    "ar, diffusion, linear-spec, quadratic-spec).",
)
@click.option(
    "--block-length",
    type=int,
    default=None,
    help="Nemotron-Labs-Diffusion: block length (default: the checkpoint's, 32; quadratic-spec: 4 rows, "
    "since its rows*(rows+1)-token forward is compute-bound on Apple GPUs beyond that).",
)
@click.option("--threshold", type=float, default=None, help="Nemotron-Labs-Diffusion: unmasking confidence threshold.")
@click.option("--no-lora", is_flag=True, help="Nemotron-Labs-Diffusion linear-spec: draft without the LoRA.")
@click.option("--max-thinking-tokens", type=int, default=None, help="Nemotron-Labs-Diffusion: force </think> after N.")
def generate_command(
    model,
    draft_model,
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
    verbose,
    prefill_step_size,
    stop,
    image,
    visualize,
    mode,
    no_lora,
    **knobs,
):
    """Generate text: plain AR, DFlash with --draft-model, or a diffusion model's own modes."""
    if image:
        raise DLLMError("image input is not supported yet")
    if prefill_step_size < 1:
        raise DLLMError(f"prefill step size must be positive, got {prefill_step_size}")
    target, tokenizer, drafter = load_models(model, draft_model)
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = build_prompt(tokenizer, prompt, system_prompt, ignore_chat_template)
    options = {k: v for k, v in knobs.items() if v is not None}
    if no_lora:
        options["lora"] = False
    if "max_thinking_tokens" in options:
        options["end_think_token_id"] = end_think_id(tokenizer)
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
            click.echo("=" * 10)  # after the first response: a bad flag fails before anything is printed
            if view is not None:
                view.committed("\n")
        click.echo(response.text, nl=False)
        if view is not None:
            view.committed(response.text)
    click.echo()
    if verbose and response is not None:
        click.echo("=" * 10)
        click.echo(summary(response))
