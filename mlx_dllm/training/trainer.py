"""`train-drafter`: a DFlash drafter trained with MLX on a frozen target's own responses.

Each step takes sequences up to `batch_tokens`. Per sequence: one target forward gives the features of every
position; `anchors` random positions of the response each start a block [anchor, mask x (B-1)], and all of them
go through the drafter in one forward (`AnchorBlocks`). Gradients are summed over the step's blocks, clipped, and
AdamW takes a step on a warmup + cosine schedule. Data order and anchors derive from the seed and the step, so a
resumed run repeats an uninterrupted one exactly.

`--arch dflash2` trains a DFlash2 drafter: v1's plus the layers' convolutions and the candidate selector, which
start as the identity (a fresh DFlash2 drafts exactly as the DFlash drafter it starts from), and the selector's
term in the loss (selector.py).
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..errors import DLLMError
from ..models import dflash, dflash2
from ..models.dflash import AnchorBlocks, Model as DFlashDraft
from ..models.target import Target
from . import checkpoints, data
from .features import TargetFeatures
from .drafter_config import (ARCHITECTURES, DFLASH2_DEFAULTS, SELECTOR_LOSS_WEIGHT, as_dflash2, check_target_layers,
                             choose_mask_token, default_target_layers, drafter_config)
from .objective import LOSSES, Objective, accepted_lengths, block_loss, default_gamma
from .selector import selector_loss
from .vocabulary import LOSS_VOCABS, SeenVocabHead, seen_tokens
from .warm_start import adopt_architecture, read_initial_drafter


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    block_size: Optional[int] = None  # DEFAULT_BLOCK_SIZE, or the --init drafter's
    num_layers: Optional[int] = None  # DEFAULT_NUM_LAYERS, or the --init drafter's
    target_layers: Optional[List[int]] = None
    anchors: int = 64
    loss: str = "decay"
    loss_decay: Optional[float] = None
    dpace_alpha: float = 0.5
    steps: Optional[int] = None
    epochs: float = 1.0
    batch_tokens: int = 4096
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    save_every: int = 50
    held_out: float = 0.02
    max_response_tokens: int = 256
    generation_batch: int = 32
    mask_token_id: Optional[int] = None
    init: str = "target"  # one of INITS, or a drafter folder to continue from
    loss_vocab: str = "all"
    cache_features: bool = False
    eval_prompts: int = 8
    eval_tokens: int = 128
    resume: bool = False
    arch: Optional[str] = None  # one of ARCHITECTURES; None: the --init drafter's, else dflash
    # DFlash2's fields (None: the --init DFlash2 drafter's, else DFLASH2_DEFAULTS) and its selector's loss weight.
    conv_kernel_size: Optional[int] = None
    conv_group_size: Optional[int] = None
    selector_rank: Optional[int] = None
    selector_top_k: Optional[int] = None
    selector_loss_weight: Optional[float] = None  # SELECTOR_LOSS_WEIGHT
    # What the run found, for the model card (not options).
    facts: Dict = field(default_factory=dict)


INITS = ("target", "random")
DEFAULT_BLOCK_SIZE = 16
DEFAULT_NUM_LAYERS = 1
DFLASH2_OPTIONS = tuple(DFLASH2_DEFAULTS) + ("selector_loss_weight",)
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
RESUME_KEYS = (  # a resumed run must agree with its checkpoint on everything that shapes the result
    "model", "data", "block_size", "num_layers", "target_layers", "anchors", "loss", "loss_decay", "dpace_alpha",
    "steps", "epochs", "batch_tokens", "lr", "warmup", "weight_decay", "clip", "seed", "held_out",
    "max_response_tokens", "mask_token_id", "init", "loss_vocab", "arch", *DFLASH2_OPTIONS,
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(config: TrainConfig) -> None:
    """Ranges first: nothing reaches MLX, and nothing is written, before these pass."""
    if config.block_size is not None and config.block_size < 2:
        raise DLLMError(f"--block-size must be at least 2 (one anchor and one proposal), got {config.block_size}")
    positive = {"--num-layers": 1 if config.num_layers is None else config.num_layers, "--anchors": config.anchors,
                "--batch-tokens": config.batch_tokens,
                "--save-every": config.save_every, "--max-response-tokens": config.max_response_tokens,
                "--generation-batch": config.generation_batch}
    for name, value in positive.items():
        if value < 1:
            raise DLLMError(f"{name} must be at least 1, got {value}")
    if config.steps is not None and config.steps < 1:
        raise DLLMError(f"--steps must be at least 1, got {config.steps}")
    if not config.epochs > 0:
        raise DLLMError(f"--epochs must be positive, got {config.epochs}")
    if not config.init:
        raise DLLMError(f"--init takes {', '.join(INITS)} or a drafter folder")
    if config.loss_vocab not in LOSS_VOCABS:
        raise DLLMError(f"--loss-vocab must be one of {', '.join(LOSS_VOCABS)}, got {config.loss_vocab}")
    if config.loss not in LOSSES:
        raise DLLMError(f"--loss must be one of {', '.join(LOSSES)}, got {config.loss}")
    if config.loss_decay is not None and not config.loss_decay > 0:
        raise DLLMError(f"--loss-decay must be positive, got {config.loss_decay}")
    if not 0 <= config.dpace_alpha < 1:
        raise DLLMError(f"--dpace-alpha must be in [0, 1), got {config.dpace_alpha}")
    if not (config.lr > 0 and 0 <= config.warmup < 1 and config.clip > 0 and config.weight_decay >= 0):
        raise DLLMError("--lr and the clip must be positive, the warmup fraction in [0, 1)")
    if not 0 <= config.held_out < 1:
        raise DLLMError(f"--held-out must be in [0, 1), got {config.held_out}")
    if config.eval_prompts < 0 or config.eval_tokens < 1:
        raise DLLMError("--eval-prompts must be at least 0 and --eval-tokens at least 1")
    check_dflash2_options(config)


def check_dflash2_options(config: TrainConfig) -> None:
    if config.arch is not None and config.arch not in ARCHITECTURES:
        raise DLLMError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {config.arch}")
    if config.arch == "dflash" or (config.arch is None and config.init in INITS):
        refuse_dflash2_options(config)
    for name in DFLASH2_DEFAULTS:
        value, limit = getattr(config, name), dflash2.LIMITS.get(name)
        if value is not None and (value < 1 or (limit is not None and value > limit)):
            raise DLLMError(f"{flag(name)} must be between 1 and {limit}, got {value}" if limit else
                            f"{flag(name)} must be at least 1, got {value}")
    weight = config.selector_loss_weight
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise DLLMError(f"--selector-loss-weight must be a finite number >= 0, got {weight}")


def refuse_dflash2_options(config: TrainConfig) -> None:
    given = [name for name in DFLASH2_OPTIONS if getattr(config, name) is not None]
    if given:
        raise DLLMError(f"{flag(given[0])} is a DFlash2 option: pass --arch dflash2")


def choose_architecture(config: TrainConfig, initial) -> None:
    """--arch (default: the --init drafter's, else dflash), and DFlash2's fields: the --init DFlash2 drafter's
    (adopt_architecture), else the options, else z-lab's published values."""
    config.arch = config.arch or (initial.arch if initial is not None else "dflash")
    if config.arch == "dflash":
        refuse_dflash2_options(config)
        if initial is not None and initial.arch == "dflash2":
            raise DLLMError(f"--init {config.init} is a DFlash2 drafter: --arch dflash cannot continue it")
    if initial is not None:
        adopt_architecture(config, initial)
    if config.arch == "dflash2":
        for name, value in {**DFLASH2_DEFAULTS, "selector_loss_weight": SELECTOR_LOSS_WEIGHT}.items():
            if getattr(config, name) is None:
                setattr(config, name, value)


def check_dflash2_fits(config: TrainConfig, hidden_size: int, tokens: int, source: str) -> None:
    """The DFlash2 fields against the target (its hidden size) and the `tokens` the drafter drafts from."""
    if config.arch != "dflash2":
        return
    if hidden_size % config.conv_group_size:
        raise DLLMError(f"--conv-group-size {config.conv_group_size} does not divide the target's hidden size "
                        f"{hidden_size}")
    if config.selector_top_k > tokens:
        raise DLLMError(f"--selector-top-k {config.selector_top_k} exceeds the {tokens} tokens the drafter drafts "
                        f"from ({source})")


def work_folder(out: Path) -> Path:
    """Beside the drafter: cached responses and checkpoints, kept so a rerun or `--resume` reuses them."""
    return out.parent / f"{out.name}.work"


def train(config: TrainConfig) -> Path:
    from .. import loading
    from ..staging import check_destination

    check_options(config)
    out = Path(config.out)
    if out.exists() or out.is_symlink():
        raise DLLMError(f"--out {out} already exists; give a new folder for the drafter")
    check_destination(out, force=False)
    work = work_folder(out)
    if not config.resume and checkpoints.latest(work) is not None:
        raise DLLMError(f"{work} holds a checkpoint of an earlier run: pass --resume to continue it, or remove it")
    if config.resume and checkpoints.latest(work) is None:
        raise DLLMError(f"--resume: {work} holds no checkpoint to continue")
    records = data.read_records(Path(config.data))
    folder = loading.resolve(config.model)  # once: the default model says where it came from once
    model, tokenizer, _ = loading.load_pair(str(folder))
    if not hasattr(model, "layers"):
        raise DLLMError(f"{config.model} is not an autoregressive target")
    initial = None
    if config.init not in INITS:
        initial = read_initial_drafter(config.init, model.args)
    choose_architecture(config, initial)
    check_dflash2_fits(config, model.args.hidden_size, model.args.vocab_size, "the target's vocabulary")
    config.block_size = config.block_size or DEFAULT_BLOCK_SIZE
    config.num_layers = config.num_layers or DEFAULT_NUM_LAYERS
    num_layers = len(model.layers)
    layer_ids = check_target_layers(config.target_layers or default_target_layers(num_layers), num_layers)
    config.target_layers = layer_ids
    target = Target(model, layer_ids)
    train_records, evaluation = data.split(records, config.held_out)
    data.prompt_ids(tokenizer, train_records[0].prompt)  # a chat template exists, before anything is written

    work.mkdir(parents=True, exist_ok=True)
    target_id = data.target_identity(folder)
    examples = load_examples(config, model, tokenizer, train_records, work, target_id)
    vocab_rows = target.embed_tokens.weight.shape[0]
    used = {token for example in examples for token in example.ids}
    config.mask_token_id = choose_mask_token(tokenizer, vocab_rows, config.mask_token_id, used)
    draft_vocab = seen_tokens(examples).tolist() if config.loss_vocab == "seen" else None
    if initial is not None:
        draft_vocab = initial.draft_vocab(draft_vocab)
        draft_config = initial.draft_config(config.block_size, draft_vocab)
    else:
        draft_config = drafter_config(model.args, config.num_layers, config.block_size, layer_ids,
                                      config.mask_token_id, draft_vocab)
    if draft_vocab is not None:
        check_dflash2_fits(config, model.args.hidden_size, len(draft_vocab), "--loss-vocab seen: the tokens seen")
    if config.arch == "dflash2":
        draft_config = as_dflash2(draft_config, {name: getattr(config, name) for name in DFLASH2_DEFAULTS})
    draft_config.setdefault("num_target_layers", num_layers)  # z-lab's loader needs it
    features = TargetFeatures(target, work / "features" if config.cache_features else None, target_id)
    run = Run(config, target, examples, draft_config, features, initial.weights if initial else None)
    if config.resume:
        run.restore(work)
    start = time.perf_counter()
    run.loop(work)
    seconds = time.perf_counter() - start + run.facts.get("seconds_before", 0)
    config.facts.update(run.facts, train_seconds=round(seconds, 1))
    config.facts["held_out_prompts"] = len(evaluation)
    if config.eval_prompts and evaluation:
        config.facts.update(measure_acceptance(model, tokenizer, run.draft, evaluation[: config.eval_prompts],
                                               config.eval_tokens))
    from .drafter_folder import write_drafter

    return write_drafter(out, run.draft, draft_config, config, tokenizer)


def load_examples(config, model, tokenizer, records, work: Path, target_id: str) -> List[data.Example]:
    """Finished pairs as given; prompts answered by the target (cached in `work/responses`)."""
    from tqdm import tqdm

    pairs = [data.pair_example(tokenizer, record) for record in records if record.response is not None]
    prompts = [record for record in records if record.response is None]
    generated = []
    if prompts:
        with tqdm(total=len(prompts), desc="target responses", unit="prompt") as bar:
            generated = list(data.generated_examples(
                model, tokenizer, prompts, work / "responses", target_id,
                config.max_response_tokens, config.generation_batch, bar.update,
            ))
    examples = [example for example in pairs + generated if len(example.ids) - example.response_start >= 2]
    if not examples:
        raise DLLMError("no training sequence has a response of two tokens or more")
    return examples


class Run:
    """The drafter, its optimizer and the fixed plan of which sequences each step trains on."""

    def __init__(self, config: TrainConfig, target: Target, examples: Sequence[data.Example], draft_config: Dict,
                 features: Optional[TargetFeatures] = None, initial_weights: Optional[List] = None):
        self.config, self.target, self.examples = config, target, examples
        self.features = features or TargetFeatures(target)
        vocab = draft_config["dflash_config"].get("draft_vocab")
        self.head = SeenVocabHead(target, np.array(vocab, dtype=np.int32)) if vocab else target.lm_head
        self.token_ids = self.head.token_ids if vocab else (lambda indices: indices)
        mx.random.seed(config.seed)
        architecture = dflash2 if dflash2.FAMILY.built_as(draft_config) else dflash
        # float32 master weights, whatever the target
        self.draft = architecture.Model(architecture.ModelArgs.from_dict(draft_config))
        self.selects = isinstance(self.draft, dflash2.Model)
        if initial_weights is not None:  # --init FOLDER
            load_initial_weights(self.draft, initial_weights)
        else:
            if config.init == "target":
                initialize_from_target(self.draft, target)
            start_attention_sharp(self.draft)
        if self.selects and not any(dflash2.is_added(name) for name, _ in initial_weights or ()):
            start_as_dflash(self.draft)
        mx.eval(self.draft.parameters())
        self.plan = step_plan(examples, config)
        total = len(self.plan)
        warmup = max(1, int(total * config.warmup)) if config.warmup > 0 else 0
        cosine = optim.cosine_decay(config.lr, max(1, total - warmup), end=config.lr * 0.1)
        schedule = optim.join_schedules([optim.linear_schedule(0.0, config.lr, warmup), cosine], [warmup]) \
            if warmup else cosine
        self.optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
        self.optimizer.init(self.draft.trainable_parameters())
        gamma = config.loss_decay or default_gamma(config.block_size)
        self.objective = Objective(config.loss, gamma, config.dpace_alpha)
        self.facts = {"sequences": len(examples), "tokens": sum(len(e.ids) for e in examples),
                      "response_tokens": sum(len(e.ids) - e.response_start for e in examples), "steps": total}
        self.loss_and_grad = nn.value_and_grad(self.draft, self._sequence_loss)

    def restore(self, work: Path) -> None:
        state = checkpoints.load(work, self.draft, self.optimizer, asdict_options(self.config))
        self.facts["seconds_before"] = state.get("seconds", 0)

    @property
    def step(self) -> int:
        """Steps taken: the optimizer's own counter, updated in the same evaluation as the weights, so a
        checkpoint written after an interrupt never pairs new weights with an old step."""
        return int(self.optimizer.step.item())

    def _sequence_loss(self, block_ids, features, anchors, labels, valid, predecessors):
        """(the loss, its parts for the progress bar): the block loss, plus DFlash2's weighted selector term."""
        hidden = self.draft(self.target.embed(block_ids), features, AnchorBlocks(anchors), start=1)
        logits = self.draft.logits(self.head(hidden))  # what the drafter proposes from at inference
        loss, correct, weights = block_loss(self.objective, logits, labels, valid)
        if not self.selects:
            return loss, {"correct": correct}
        selector, hits = selector_loss(self.draft.candidate_selector, self.objective, hidden, logits, labels,
                                       predecessors, self.token_ids, weights, valid)
        return loss + self.config.selector_loss_weight * selector, {"correct": correct, "selector": selector,
                                                                    "hits": hits}

    def sequence_grads(self, example: data.Example, rng: np.random.Generator):
        ids = np.array(example.ids, dtype=np.int32)
        anchors = sample_anchors(example, self.config.anchors, rng)
        B = self.config.block_size
        offsets = np.arange(1, B)
        label_positions = anchors[:, None] + offsets[None]
        valid = label_positions < len(ids)
        labels = ids[np.minimum(label_positions, len(ids) - 1)]
        predecessors = ids[np.minimum(label_positions - 1, len(ids) - 1)]  # real ids: the codebooks' rows
        if isinstance(self.head, SeenVocabHead):
            labels = self.head.labels(labels)
        block_ids = np.full((len(anchors), B), self.config.mask_token_id, dtype=np.int32)
        block_ids[:, 0] = ids[anchors]
        features = self.features(example.ids)
        (loss, parts), grads = self.loss_and_grad(
            mx.array(block_ids), features, mx.array(anchors), mx.array(labels), mx.array(valid),
            mx.array(predecessors),
        )
        return loss, parts, mx.array(valid), grads, len(anchors)

    def train_step(self) -> Dict:
        total_loss, selector_sum, blocks, grads = 0.0, 0.0, 0, None
        correct_sum = mx.zeros((self.config.block_size - 1,))
        valid_sum = mx.zeros((self.config.block_size - 1,))
        hits_sum = mx.zeros(())
        lengths = []
        for index in self.plan[self.step]:
            rng = np.random.default_rng([self.config.seed, self.step, index])
            loss, parts, valid, sequence_grads, count = self.sequence_grads(self.examples[index], rng)
            grads = sequence_grads if grads is None else tree_map(mx.add, grads, sequence_grads)
            correct = parts["correct"]
            correct_sum = correct_sum + correct.sum(axis=0)
            valid_sum = valid_sum + valid.sum(axis=0)
            accepted, complete = accepted_lengths(correct, valid)
            lengths.append(mx.where(complete, accepted, 0).sum() / mx.maximum(complete.sum(), 1))
            if self.selects:
                hits_sum = hits_sum + parts["hits"].sum()
            mx.eval(grads, loss, correct_sum, valid_sum, hits_sum, lengths[-1])
            total_loss += loss.item()
            selector_sum += parts["selector"].item() if self.selects else 0.0
            blocks += count
        grads = tree_map(lambda g: g / blocks, grads)
        grads, _ = optim.clip_grad_norm(grads, self.config.clip)
        self.optimizer.update(self.draft, grads)
        mx.eval(self.draft.parameters(), self.optimizer.state)
        accuracy = (correct_sum / mx.maximum(valid_sum, 1)).tolist()
        stats = {"loss": total_loss / blocks, "accuracy": accuracy, "tau": float(np.mean([x.item() for x in lengths]))}
        if self.selects:  # the selector's own term, and how often the true token was a candidate at all
            stats.update(selector_loss=selector_sum / blocks,
                         candidate_recall=hits_sum.item() / max(valid_sum.sum().item(), 1))
        return stats

    def loop(self, work: Path) -> None:
        from tqdm import tqdm

        from ..staging import terminate_unwinds

        options = asdict_options(self.config)
        started = time.perf_counter()
        seconds_before = self.facts.get("seconds_before", 0)
        last = None
        with terminate_unwinds(), tqdm(total=len(self.plan), initial=self.step, desc="training", unit="step") as bar:
            try:
                while self.step < len(self.plan):
                    last = self.train_step()
                    self.facts.setdefault("first_loss", round(last["loss"], 4))
                    bar.update(1)
                    bar.set_postfix_str(progress_text(last))
                    # The last step too: an evaluation or write that fails after it loses no training (--resume).
                    if self.step % self.config.save_every == 0 or self.step == len(self.plan):
                        checkpoints.save(work, self.draft, self.optimizer, self.step, options,
                                         seconds_before + time.perf_counter() - started)
            except (KeyboardInterrupt, SystemExit):
                checkpoints.save(work, self.draft, self.optimizer, self.step, options,
                                 seconds_before + time.perf_counter() - started)
                bar.write(f"[INFO] Checkpoint of step {self.step} saved in {work}; --resume continues it")
                raise
        if last is not None:
            self.facts.update(final_loss=round(last["loss"], 4), final_tau_estimate=round(last["tau"], 3),
                              final_accuracy=[round(a, 3) for a in last["accuracy"]])
            if self.selects:
                self.facts.update(final_selector_loss=round(last["selector_loss"], 4),
                                  final_candidate_recall=round(last["candidate_recall"], 3))


def initialize_from_target(draft: DFlashDraft, target: Target) -> None:
    """Start the drafter as the target's layers that follow its last captured one, reading that layer's output.

    `fc` picks the last feature slice, `hidden_norm` is the next layer's input norm (the context then enters as
    the target's own next layer sees it) and the final norm is the target's. Parameters whose shapes differ
    (another attention or MLP layout) keep their random start; the drafter's q/k norms start at one."""
    last = max(target.capture_layer_ids)
    first = min(last + 1, target.num_layers - len(draft.layers))
    sources = target.layers[first : first + len(draft.layers)]
    hidden = draft.args.hidden_size
    fc = mx.zeros(draft.fc.weight.shape)
    slot = target.capture_layer_ids.index(last)
    fc[:, slot * hidden : (slot + 1) * hidden] = mx.eye(hidden)
    updates = {"fc": {"weight": fc}}
    if sources and getattr(sources[0], "input_layernorm", None) is not None:
        updates["hidden_norm"] = {"weight": sources[0].input_layernorm.weight}
    if target.final_norm is not None and getattr(target.final_norm, "weight", None) is not None:
        updates["norm"] = {"weight": target.final_norm.weight}
    draft.update(updates)
    for layer, source in zip(draft.layers, sources):
        own = dict(tree_flatten(layer.parameters()))
        copied = [(name, value) for name, value in tree_flatten(source.parameters())
                  if name in own and own[name].shape == value.shape and value.dtype in FLOATS]
        layer.load_weights([(name, value.astype(mx.float32)) for name, value in copied], strict=False)


def load_initial_weights(draft: DFlashDraft, weights: List) -> None:
    """--init FOLDER's weights: all of them, or a DFlash drafter's into a DFlash2 one, whose every other weight must
    be there (the modules DFlash2 adds then start as the identity)."""
    if not isinstance(draft, dflash2.Model) or any(dflash2.is_added(name) for name, _ in weights):
        draft.load_weights(weights, strict=True)
        return
    given = {name for name, _ in weights}
    missing = [name for name, _ in tree_flatten(draft.parameters()) if not dflash2.is_added(name) and name not in given]
    if missing:
        raise DLLMError(f"the --init drafter lacks {missing[0]}")
    draft.load_weights(weights, strict=False)


def start_as_dflash(draft: dflash2.Model) -> None:
    """DFlash2's added modules start as the identity (z-lab's and NeMo's init), so a fresh DFlash2 drafter drafts as
    the DFlash drafter it holds: each convolution keeps only its tap 0 (the position itself) with weight 1 and no
    dynamic part, and the selector's pair term is zero (its walk is then the argmax chain). The codebooks start small
    and random, so the hidden projection, zero, still gets a gradient."""
    for layer in draft.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            kernel = np.zeros(conv.base_kernel.shape, dtype=np.float32)
            kernel[:, 0] = 1.0
            conv.base_kernel = mx.array(kernel)
            conv.kernel_projection.weight = mx.zeros_like(conv.kernel_projection.weight)
    selector = draft.candidate_selector
    selector.hidden_projection.weight = mx.zeros_like(selector.hidden_projection.weight)
    for codebook in (selector.predecessor_codebook, selector.successor_codebook):
        codebook.weight = 0.02 * mx.random.normal(codebook.weight.shape)


def start_attention_sharp(draft: DFlashDraft) -> None:
    """q/k norms start at head_dim**0.25, not 1: scaled q.k logits then spread like an unnormalised dot product
    (std ~sqrt(head_dim)) instead of std ~1, which leaves attention over hundreds of context rows nearly uniform
    and slow to sharpen (measured on SmolLM2: one sequence, 60 steps, loss 4.1 at 1 against 2.3 at 3)."""
    for layer in draft.layers:
        attention = layer.self_attn
        start = attention.head_dim**0.25
        attention.q_norm.weight = mx.full(attention.q_norm.weight.shape, start)
        attention.k_norm.weight = mx.full(attention.k_norm.weight.shape, start)


def progress_text(stats: Dict) -> str:
    accuracy = "/".join(f"{a:.2f}" for a in stats["accuracy"][:4])
    text = f"loss {stats['loss']:.3f} acc {accuracy}.. tau~{stats['tau']:.2f}"
    if "selector_loss" in stats:
        text += f" selector {stats['selector_loss']:.3f} recall {stats['candidate_recall']:.2f}"
    return text


def asdict_options(config: TrainConfig) -> Dict:
    options = asdict(config)
    return {key: options[key] for key in RESUME_KEYS}


def sample_anchors(example: data.Example, count: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct random positions of the response that have at least one label after them, in order."""
    positions = np.arange(example.response_start, len(example.ids) - 1)
    if len(positions) > count:
        positions = np.sort(rng.choice(positions, size=count, replace=False))
    return positions.astype(np.int32)


def step_plan(examples: Sequence[data.Example], config: TrainConfig) -> List[List[int]]:
    """Which sequences each step trains on: each epoch a seeded shuffle, packed in order up to `batch_tokens`."""
    steps: List[List[int]] = []
    wanted = config.steps
    epoch = 0
    per_epoch = None
    while True:
        order = np.random.default_rng([config.seed, epoch]).permutation(len(examples))
        batch, tokens = [], 0
        epoch_steps = []
        for index in order.tolist():
            size = len(examples[index].ids)
            if batch and tokens + size > config.batch_tokens:
                epoch_steps.append(batch)
                batch, tokens = [], 0
            batch.append(index)
            tokens += size
        if batch:
            epoch_steps.append(batch)
        per_epoch = per_epoch or len(epoch_steps)
        steps += epoch_steps
        epoch += 1
        if wanted is None and len(steps) >= math.ceil(config.epochs * per_epoch):
            return steps[: math.ceil(config.epochs * per_epoch)]
        if wanted is not None and len(steps) >= wanted:
            return steps[:wanted]


def measure_acceptance(model, tokenizer, draft, records, max_tokens: int) -> Dict:
    """Greedy DFlash on held-out prompts through the real decoding loop: the mean accepted length per round."""
    from ..sampler import stream_generate

    lengths, forwards, tokens = [], 0, 0
    for record in records:
        response = None
        for response in stream_generate(model, tokenizer, data.prompt_ids(tokenizer, record.prompt), max_tokens,
                                        draft_model=draft):
            pass
        if response is not None and response.acceptance_length is not None:
            lengths.append(response.acceptance_length)
            forwards += response.forwards
            tokens += response.generation_tokens
    if not lengths:
        return {}
    return {"held_out_acceptance_length": round(float(np.mean(lengths)), 3), "held_out_eval_prompts": len(lengths),
            "held_out_eval_max_tokens": max_tokens}

