"""DFlash2 block-diffusion drafter (z-lab `DFlash2DraftModel`): DFlash v1 plus two pieces.

- Every layer wraps its attention and its MLP in a grouped dynamic causal convolution over the block: each output
  position mixes itself and the `conv_kernel_size - 1` block positions before it, channel by channel, with a
  learned base kernel plus a kernel predicted from the layer's normed input (one value per group of
  `conv_group_size` channels). One projection predicts the taps of the convolution before and of the one after.
- A candidate selector chooses the block's chain: each position keeps its `selector_top_k` most probable tokens,
  scored by their logit plus a rank-`selector_rank` bilinear term (the previous chosen token's predecessor code x
  the projected hidden state x the candidate's successor code), and a walk from the anchor chooses the best at
  each position in turn. That path, not the argmax at each position, is the drafter's proposal; when sampling
  (a chain's sampled proposals, sampler/dflash.py), the walk draws each position's token from the softmax of its
  candidates' scores under the sampling configuration, as z-lab's reference does at temperature > 0. For a tree,
  `lattice` scores every candidate given every candidate of the position before: the best paths through that
  K x P lattice, not only the walk's one, are verified (sampler/tree.py).

The rest (context fusion, attention, caches, the shared embedding and head) is v1's, imported from dflash.py.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..configs import SIZE_LIMITS
from ..errors import DLLMError
from . import dflash
from .family import TINY_VOCAB, Family, Tiny

# Ceilings far above any released drafter (kernel 4, rank and top-k in the tens), low enough to build at once.
LIMITS = {"conv_kernel_size": 256, "selector_rank": 1 << 12, "selector_top_k": 1 << 10}
FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
# z-lab's checkpoints store the codebooks as bare tensors, without the `.weight` of an embedding.
CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


@dataclass
class ModelArgs(dflash.ModelArgs):
    architectures: List[str] = field(default_factory=lambda: ["DFlash2DraftModel"])
    conv_kernel_size: Optional[int] = None
    conv_group_size: Optional[int] = None
    selector_rank: Optional[int] = None
    selector_top_k: Optional[int] = None

    def __post_init__(self):
        nested = self.dflash_config or {}
        for key in FIELDS:  # read as v1's fields are: `dflash_config` first, then the top level
            if nested.get(key) is not None:
                setattr(self, key, nested[key])
        super().__post_init__()
        missing = [key for key in ("vocab_size",) + FIELDS if getattr(self, key) is None]
        if missing:
            raise DLLMError(f"DFlash2 config is missing {', '.join(missing)}")
        limits = {**LIMITS, "conv_group_size": self.hidden_size, "vocab_size": SIZE_LIMITS["vocab_size"]}
        for key, limit in limits.items():
            value = getattr(self, key)
            if not dflash.is_index(value) or not 1 <= value <= limit:
                raise DLLMError(f"DFlash2 config: {key} must be an integer between 1 and {limit}, got {value!r}")
        if self.hidden_size % self.conv_group_size:
            raise DLLMError(
                f"DFlash2 config: conv_group_size {self.conv_group_size} does not divide hidden_size {self.hidden_size}"
            )
        choices = self.vocab_size if self.draft_vocab is None else len(self.draft_vocab)
        if self.selector_top_k > choices:
            raise DLLMError(
                f"DFlash2 config: selector_top_k {self.selector_top_k} exceeds the {choices} tokens it drafts from"
            )


def is_added(name: str) -> bool:
    """Whether a parameter belongs to what DFlash2 adds to v1: a layer's convolutions or the candidate selector."""
    parts = name.split(".")
    return parts[0] == "candidate_selector" or "attention_conv" in parts or "mlp_conv" in parts


def checkpoint_names(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """MLX names -> z-lab's (bare codebooks), so its own loader reads what we write: the inverse of `sanitize`."""
    return {name.removesuffix(".weight") if name.removesuffix(".weight") in CODEBOOKS else name: value
            for name, value in weights.items()}


class DynamicCausalConv(nn.Module):
    """Two grouped dynamic causal convolutions over the block, one before and one after a sublayer, whose dynamic
    taps both come from the sublayer's input. Tap j of position t reads position t - j; taps before the block's
    start read zeros (the convolution never reaches the context)."""

    def __init__(self, hidden_size: int, kernel_size: int, group_size: int):
        super().__init__()
        self.kernel_size, self.group_size = kernel_size, group_size
        self.base_kernel = mx.zeros((2, kernel_size, hidden_size))  # [before/after, tap, channel]
        self.kernel_projection = nn.Linear(hidden_size, 2 * kernel_size * (hidden_size // group_size), bias=False)

    def prepare(self, x: mx.array):
        """(x convolved before the sublayer, the dynamic taps of the convolution after it)."""
        taps = self.kernel_projection(x).reshape(*x.shape[:-1], 2, self.kernel_size, -1)  # [.., L, 2, k, groups]
        return self._convolve(x, taps[..., 0, :, :], 0), taps[..., 1, :, :]

    def finish(self, x: mx.array, taps: mx.array) -> mx.array:
        return self._convolve(x, taps, 1)

    def _convolve(self, x: mx.array, taps: mx.array, which: int) -> mx.array:
        """x [N, L, H], taps [N, L, k, groups] -> [N, L, H]."""
        k, L = self.kernel_size, x.shape[1]
        padded = mx.pad(x, [(0, 0), (k - 1, 0), (0, 0)])
        shifted = mx.stack([padded[:, k - 1 - j : k - 1 - j + L] for j in range(k)], axis=2)  # [N, L, k, H]
        kernel = self.base_kernel[which] + mx.repeat(taps, self.group_size, axis=-1)  # each group's tap per channel
        return (kernel * shifted).sum(axis=2)


class DecoderLayer(dflash.DecoderLayer):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__(args, layer_type)
        self.attention_conv = DynamicCausalConv(args.hidden_size, args.conv_kernel_size, args.conv_group_size)
        self.mlp_conv = DynamicCausalConv(args.hidden_size, args.conv_kernel_size, args.conv_group_size)

    def __call__(self, x: mx.array, context: mx.array, cache) -> mx.array:
        # The block's K/V come from the convolved input; the context rows are v1's (fc + hidden_norm only).
        h, taps = self.attention_conv.prepare(self.input_layernorm(x))
        h = x + self.attention_conv.finish(self.self_attn(h, context, cache), taps)
        m, taps = self.mlp_conv.prepare(self.post_attention_layernorm(h))
        return h + self.mlp_conv.finish(self.mlp(m), taps)


class CandidateSelector(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.selector_top_k
        self.predecessor_codebook = nn.Embedding(args.vocab_size, args.selector_rank)
        self.successor_codebook = nn.Embedding(args.vocab_size, args.selector_rank)
        self.hidden_projection = nn.Linear(args.hidden_size, args.selector_rank, bias=False)

    def candidates(self, logits: mx.array) -> mx.array:
        """Indices of the `top_k` largest logits of each row [..., V] -> [..., K] (in no particular order)."""
        return mx.argpartition(-logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k]

    def pair_scores(self, queries: mx.array, predecessors: mx.array, candidates: mx.array) -> mx.array:
        """The pair term of each candidate after its predecessor: <pred(predecessor) * W hidden, succ(candidate)>.
        queries [..., R] (`hidden_projection` of the hidden states, projected once by the caller), predecessor token
        ids [...], candidate token ids [..., K] -> [..., K]. The walk scores one position at a time; training
        (training/selector.py) scores every position after its true predecessor."""
        pair = self.predecessor_codebook(predecessors) * queries  # [..., R]
        return (self.successor_codebook(candidates) * pair[..., None, :]).sum(axis=-1)

    def __call__(
        self,
        hidden: mx.array,
        logits: mx.array,
        anchor: int,
        token_ids: Callable[[mx.array], mx.array],
        sampling=None,
    ):
        """hidden [P, H] and logits [P, V] of positions 1..P -> the chosen token ids [P]. `token_ids` maps indices
        of the logits to token ids (the codebooks' rows). Each step depends on the last choice, so the walk is P
        small steps, built lazily: no host sync.

        With `sampling` (common.Sampling) each step draws from its scores' distribution under it instead of taking
        the best, and the walk returns (token ids [P], the probability of each draw [P], each step's distribution
        q [P, K], its candidates' token ids [P, K])."""
        unary, candidates = self.top(logits, token_ids)
        queries = self.hidden_projection(hidden)  # [P, R], once for the whole walk
        chosen = mx.array([anchor])
        path, drawn, distributions = [], [], []
        for position in range(hidden.shape[0]):
            row = slice(position, position + 1)
            scores = unary[position] + self.pair_scores(queries[row], chosen, candidates[row])[0]  # [K]
            if sampling is None:
                index = mx.argmax(scores, keepdims=True)
            else:
                log_q = sampling.log_probs(scores[None])  # [1, K]
                index = sampling.categorical(log_q)
                distributions.append(mx.exp(log_q))
                drawn.append(distributions[-1][0, index])
            chosen = candidates[position][index]
            path.append(chosen)
        if sampling is None:
            return mx.concatenate(path)
        return mx.concatenate(path), mx.concatenate(drawn), mx.concatenate(distributions), candidates

    def top(self, logits: mx.array, token_ids: Callable[[mx.array], mx.array]):
        """Each position's candidates: their logits [P, K] (the unary scores) and token ids [P, K]."""
        best = self.candidates(logits)
        return mx.take_along_axis(logits, best, axis=-1), token_ids(best)

    def lattice(self, hidden: mx.array, logits: mx.array, anchor: int, token_ids, width: int):
        """Every pair score at once, for trees (sampler/tree.py `Lattice`): position p's candidates scored given
        each candidate of position p - 1 (all given the anchor at p = 0) and normalised over the K candidates, as the
        walk's softmax is. Returns candidate ids [P, K], then per (position, parent candidate) the `width` best
        candidate indices [P, K, width] and their log-probabilities [P, K, width], most probable first."""
        unary, candidates = self.top(logits, token_ids)
        anchors = mx.full((1, self.top_k), anchor, dtype=candidates.dtype)
        parents = mx.concatenate([anchors, candidates[:-1]])  # [P, K]: position p's possible predecessors
        queries = self.hidden_projection(hidden)[:, None]  # [P, 1, R]
        pairs = self.pair_scores(queries, parents, candidates[:, None])  # [P, K parents, K candidates]
        scores = (unary[:, None] + pairs).astype(mx.float32)
        log_probs = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        ranked = mx.argsort(-log_probs, axis=-1)[..., : min(width, self.top_k)]
        return candidates, ranked, mx.take_along_axis(log_probs, ranked, axis=-1)


class Model(dflash.Model):
    """The DFlash2 drafter: v1's interface (models/drafter.py) plus `propose`, its own choice of the chain."""

    layer_class = DecoderLayer

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model_type = "dflash2"
        self.candidate_selector = CandidateSelector(args)

    def propose(self, hidden: mx.array, anchor: int, head, sampling=None, logits: Optional[mx.array] = None):
        """The selector's path over positions 1..P given their hidden states [P, H] and the anchor; `head` gives
        the logits over the tokens it drafts from (`head.logits`, unless the caller gives them: `logits`) and their
        ids (`head.token_ids`). With `sampling` the walk is drawn: see CandidateSelector."""
        logits = self._logits(hidden, head, logits)
        return self.candidate_selector(hidden, logits, anchor, head.token_ids, sampling)

    def lattice(self, hidden: mx.array, anchor: int, head, width: int):
        """The selector's candidates and pair scores for a tree of paths through them (CandidateSelector.lattice)."""
        return self.candidate_selector.lattice(hidden, self._logits(hidden, head), anchor, head.token_ids, width)

    def _logits(self, hidden: mx.array, head, logits: Optional[mx.array] = None) -> mx.array:
        logits = head.logits(hidden) if logits is None else logits
        rows, vocab, top_k = logits.shape[-1], self.args.vocab_size, self.args.selector_top_k
        if self.args.draft_vocab is None and rows > vocab:  # ids past the codebooks would read unrelated memory
            raise DLLMError(f"the target's head has {rows} tokens, the DFlash2 drafter's codebooks {vocab}")
        if rows < top_k:
            raise DLLMError(f"the target's head has {rows} tokens, fewer than the DFlash2 selector_top_k {top_k}")
        return logits

    @staticmethod
    def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        weights = dflash.Model.sanitize(weights)
        for name in CODEBOOKS:
            if name in weights:
                weights[f"{name}.weight"] = weights.pop(name)
        return weights


FAMILY = Family(
    name="dflash2",
    architectures=("DFlash2DraftModel",),  # it also carries `dflash_config`: the architecture decides (family.py)
    tiny=Tiny(
        config={
            **dflash.FAMILY.tiny.config,
            "architectures": ["DFlash2DraftModel"],
            "vocab_size": TINY_VOCAB,
            "dflash_config": {
                "conv_kernel_size": 3,
                "conv_group_size": 16,
                "selector_rank": 8,
                "selector_top_k": 4,
            },
        },
        target=dflash.FAMILY.tiny.target,
    ),
)
