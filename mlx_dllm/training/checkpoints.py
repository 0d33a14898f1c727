"""Training checkpoints: the drafter, the optimizer state and the step, written so a kill never leaves half a one.

Each checkpoint is a complete folder `checkpoint-<step>`; `latest.json`, replaced atomically once the folder is
on disk, names the one to resume. Older folders are removed after the switch.
"""

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..configs import write_json
from ..errors import DLLMError

LATEST = "latest.json"


def latest(work: Path) -> Optional[Path]:
    try:
        name = json.loads((work / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = work / name
    return folder if folder.is_dir() and folder.parent == work else None


def save(work: Path, draft, optimizer, step: int, options: Dict, seconds: float) -> None:
    folder = work / f"checkpoint-{step:07d}"
    previous = latest(work)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "drafter.safetensors"), dict(tree_flatten(draft.parameters())))
    mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    write_json(folder / "trainer.json", {"step": step, "options": options, "seconds": round(seconds, 1)})
    write_json(work / LATEST, {"checkpoint": folder.name})
    if previous is not None and previous != folder:
        shutil.rmtree(previous, ignore_errors=True)


BEFORE_ARCH = {"arch": "dflash"}  # checkpoints written before --arch existed trained DFlash v1


def load(work: Path, draft, optimizer, options: Dict) -> Dict:
    """Restore the latest checkpoint into `draft` and `optimizer`; its options must equal this run's."""
    folder = latest(work)
    state = json.loads((folder / "trainer.json").read_text())
    stored = {**BEFORE_ARCH, **state["options"]}
    differing = [key for key in options if stored.get(key) != options[key]]
    if differing:
        key = differing[0]
        raise DLLMError(
            f"--resume: the checkpoint was trained with {key}={stored.get(key)!r}, this run has "
            f"{options[key]!r}; resume with the same options"
        )
    draft.load_weights(list(mx.load(str(folder / "drafter.safetensors")).items()))
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    mx.eval(draft.parameters(), optimizer.state)
    return state
