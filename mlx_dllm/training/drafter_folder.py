"""The trained drafter as a folder `load` reads: z-lab's config layout, safetensors weights (z-lab's names, so its
own loader reads a DFlash2 drafter too) and a model card."""

import json
from pathlib import Path
from typing import Dict

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import __version__
from ..models import dflash2

CARD = """---
library_name: mlx
tags: [mlx, {tag}, speculative-decoding, mlx-dllm]
base_model: {target}
---

# {kind} drafter for {target}

A block-diffusion drafter trained with `mlx-dllm train-drafter` (mlx-dllm {version}). It reads target layers
{layers} and proposes {proposals} tokens per forward; the target verifies them, so outputs are the target's own.

```bash
mlx-dllm generate --model {target} --draft-model <this folder> -p "..."
```

## Training

| | |
|---|---|
{rows}
"""


STARTS = {"target": "the target's layers after the last one read", "random": "random weights"}


def card_rows(config, draft_config: Dict) -> str:
    facts = config.facts
    rows = {
        "data": f"{config.data}: {facts.get('sequences')} sequences, {facts.get('response_tokens')} response tokens "
        f"({facts.get('held_out_prompts', 0)} prompts held out)",
        "drafter": f"{draft_config['num_hidden_layers']} layers, hidden {draft_config['hidden_size']}, "
        f"block {config.block_size}, mask token {config.mask_token_id}",
        "start": STARTS.get(config.init, f"the drafter {config.init} (--init)"),
        "objective": objective(config),
        "steps": f"{facts.get('steps')} (batch {config.batch_tokens} tokens, {config.anchors} anchors per sequence, "
        f"lr {config.lr}, seed {config.seed})",
        "time": f"{facts.get('train_seconds')} s",
        "final loss": facts.get("final_loss"),
        "per-position accuracy (last step)": facts.get("final_accuracy"),
        "acceptance length, held-out prompts (greedy DFlash)": facts.get("held_out_acceptance_length", "not measured"),
    }
    if config.arch == "dflash2":
        rows["drafter"] += "; DFlash2: " + ", ".join(f"{name} {getattr(config, name)}" for name in dflash2.FIELDS)
        rows["final selector loss"] = facts.get("final_selector_loss")
        rows["candidate recall (last step)"] = facts.get("final_candidate_recall")
    return "\n".join(f"| {key} | {value} |" for key, value in rows.items())


def objective(config) -> str:
    block = config.loss if config.loss == "dpace" else f"decay (gamma {config.loss_decay or 'default'})"
    if config.arch != "dflash2":
        return block
    return f"{block} + {config.selector_loss_weight} x selector loss (top-{config.selector_top_k} candidates)"


def write_drafter(out: Path, draft, draft_config: Dict, config, tokenizer) -> Path:
    from ..staging import staged_folder

    with staged_folder(out, force=False) as staging:
        weights = dflash2.checkpoint_names(dict(tree_flatten(draft.parameters())))
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(draft_config, indent=2) + "\n")
        (staging / "training.json").write_text(json.dumps({**config.facts, "options": _options(config)}, indent=2))
        kind = "DFlash2" if config.arch == "dflash2" else "DFlash"
        card = CARD.format(target=config.model, version=__version__, layers=config.target_layers, kind=kind,
                           tag=kind.lower(),
                           proposals=config.block_size - 1, rows=card_rows(config, draft_config))
        (staging / "README.md").write_text(card)
    return out


def _options(config) -> Dict:
    from dataclasses import asdict

    options = asdict(config)
    options.pop("facts")
    return options
