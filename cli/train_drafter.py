"""`mlx-dllm train-drafter`: train a DFlash or DFlash2 drafter for a target with MLX."""

import click

from mlx_dllm.errors import DLLMError
from mlx_dllm.training.drafter_config import DFLASH2_DEFAULTS, SELECTOR_LOSS_WEIGHT


def layer_list(text):
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DLLMError(f"--target-layers takes comma-separated layer numbers, got {text!r}") from None


@click.command("train-drafter")
@click.option("--model", required=True,
              help="The target: an mlx-lm model folder or hub repo id ('default': SmolLM2-135M-Instruct).")
@click.option("--data", required=True, help="JSONL of prompts (the target answers them) or prompt/response pairs.")
@click.option("--out", required=True, help="New folder for the drafter (its work folder OUT.work sits beside it).")
@click.option("--block-size", type=int, default=None,
              help="Tokens per block: the anchor + proposals (default 16, or the --init drafter's).")
@click.option("--num-layers", type=int, default=None,
              help="Drafter decoder layers (default 1, or the --init drafter's).")
@click.option("--target-layers", default=None, help="Target layers to read, e.g. 1,8,14,20,27 (default: 5 spread).")
@click.option("--init", default="target", show_default=True,
              help="target: start from the target's layers after the last one read; random: from scratch; a "
                   "DFlash or DFlash2 drafter folder or hub repo: continue from it (its layers, target layers, mask "
                   "token and DFlash2 fields).")
@click.option("--arch", type=click.Choice(["dflash", "dflash2"]), default=None,
              help="dflash, or dflash2: v1 plus in-block convolutions and a candidate selector, which start as the "
                   "identity (a DFlash --init drafter starts it) [default: the --init drafter's, else dflash]")
@click.option("--conv-kernel-size", type=int, default=None,
              help="DFlash2: taps of each in-block convolution (the position and those before it) "
                   f"[default: {DFLASH2_DEFAULTS['conv_kernel_size']}, or the --init drafter's]")
@click.option("--conv-group-size", type=int, default=None,
              help="DFlash2: channels sharing one dynamic tap; divides the hidden size "
                   f"[default: {DFLASH2_DEFAULTS['conv_group_size']}, or the --init drafter's]")
@click.option("--selector-rank", type=int, default=None,
              help=f"DFlash2: rank of the selector's codebooks [default: {DFLASH2_DEFAULTS['selector_rank']}, or the "
                   "--init drafter's]")
@click.option("--selector-top-k", type=int, default=None,
              help="DFlash2: candidates per position the selector chooses among (at most the tokens drafted from) "
                   f"[default: {DFLASH2_DEFAULTS['selector_top_k']}, or the --init drafter's]")
@click.option("--selector-loss-weight", type=float, default=None,
              help="DFlash2: weight of the selector's cross-entropy over each position's candidates, scored after "
                   f"the true previous token [default: {SELECTOR_LOSS_WEIGHT}]")
@click.option("--anchors", type=int, default=64, show_default=True, help="Random anchor blocks per sequence.")
@click.option("--loss", type=click.Choice(["decay", "dpace"]), default="decay", show_default=True,
              help="decay: CE weighted exp(-(k-1)/gamma); dpace: D-PACE's accepted-length weights.")
@click.option("--loss-vocab", type=click.Choice(["all", "seen"]), default="all", show_default=True,
              help="seen: the loss's softmax over only the tokens the responses use (much faster; exact per label).")
@click.option("--cache-features", is_flag=True,
              help="Keep the target's features per sequence in OUT.work (float32: 4 bytes x 5 layers x hidden per "
                   "token) so later epochs and resumed runs skip the target forward.")
@click.option("--loss-decay", type=float, default=None, help="gamma of the decay loss (default 7 for B=16, 4 for B=8).")
@click.option("--dpace-alpha", type=float, default=0.5, show_default=True, help="D-PACE confidence smoothing.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: --epochs over the data).")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data, when no --steps.")
@click.option("--batch-tokens", type=int, default=4096, show_default=True, help="Sequence tokens per step.")
@click.option("--lr", type=float, default=6e-4, show_default=True, help="Peak AdamW learning rate (4% warmup, cosine).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the weights, data order and anchors.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps (and on Ctrl-C).")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in OUT.work exactly where it stopped.")
@click.option("--held-out", type=float, default=0.02, show_default=True, help="Fraction of prompts never trained on.")
@click.option("--mask-token-id", type=int, default=None, help="Mask token (default: the target's or a reserved id).")
@click.option("--max-response-tokens", type=int, default=256, show_default=True, help="Longest target response.")
@click.option("--eval-prompts", type=int, default=8, show_default=True, help="Held-out prompts to measure on.")
def train_drafter_command(model, data, out, block_size, num_layers, target_layers, init, arch, conv_kernel_size,
                          conv_group_size, selector_rank, selector_top_k, selector_loss_weight, anchors, loss,
                          loss_vocab, cache_features, loss_decay,
                          dpace_alpha, steps, epochs, batch_tokens, lr, seed, save_every, resume, held_out,
                          mask_token_id, max_response_tokens, eval_prompts):
    """Train a DFlash or DFlash2 drafter on a frozen target's own responses, and write it with a model card."""
    from mlx_dllm.training.trainer import TrainConfig, train

    config = TrainConfig(
        model=model, data=data, out=out, block_size=block_size, num_layers=num_layers,
        target_layers=layer_list(target_layers), init=init, anchors=anchors, loss=loss, loss_decay=loss_decay,
        dpace_alpha=dpace_alpha, steps=steps, epochs=epochs, batch_tokens=batch_tokens, lr=lr, seed=seed,
        save_every=save_every, resume=resume, held_out=held_out, mask_token_id=mask_token_id,
        max_response_tokens=max_response_tokens, eval_prompts=eval_prompts, loss_vocab=loss_vocab,
        cache_features=cache_features, arch=arch, conv_kernel_size=conv_kernel_size, conv_group_size=conv_group_size,
        selector_rank=selector_rank, selector_top_k=selector_top_k, selector_loss_weight=selector_loss_weight,
    )
    folder = train(config)
    facts = config.facts
    tau = facts.get("held_out_acceptance_length")
    measured = f", held-out acceptance length {tau}" if tau is not None else ""
    seconds = facts.get("train_seconds")
    click.echo(f"[INFO] Drafter saved to {folder} ({facts.get('steps')} steps in {seconds} s{measured})", err=True)
