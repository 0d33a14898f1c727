"""DFlash2 against z-lab's reference (`dflash==0.1.0`; skipped without it): a tiny random `DFlash2DraftModel` built by
the PyTorch reference for a transformers Qwen3 target, saved in z-lab's layout and converted by our converter.

- the drafter: hidden states within 1e-5 (float32) of the reference's, call after call on one cache, and the
  candidate selector's paths equal to the reference's (from its hidden states and from ours);
- the loop: our greedy DFlash (speculation='chain') commits the tokens of the reference's `dflash_generate`, and its
  MLX loop's (`dflash.model_mlx.stream_generate`), with the same proposal in every round.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dllm import convert, load, stream_generate
from mlx_dllm.models import dflash2
from mlx_dllm.sampler import dflash as dflash_strategy
from tests.oracle import record_chain_proposals

torch = pytest.importorskip("torch")
pytest.importorskip("dflash.model")
harness = pytest.importorskip("tests.reference.harness")
reference = pytest.importorskip("tests.reference.dflash2")

# float32, on the drafter's final-normed hidden states (|h| up to ~5): measured 7e-6 at most, where the reference's own
# float32 differs from its float64 by 8e-6 (random dynamic taps of ~1.6 make both errors 2e-5).
TOLERANCE = 1e-5
BLOCK = 8
PROMPT = [5, 17, 42, 9, 3]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The reference models (torch) and our conversions of their checkpoints."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy machine more threads only spin (the loop ran 100x slower)
    root = tmp_path_factory.mktemp("dflash2")
    target = harness.build_target("qwen3_gqa", root / "hf-target")
    draft = reference.build_draft(target.config, root / "hf-draft", block_size=BLOCK)
    paths = {f"{role}_path": convert(root / f"hf-{role}", root / role) for role in ("target", "draft")}
    yield {"target": target, "draft": draft, "hf_draft": root / "hf-draft", **paths}
    torch.set_num_threads(threads)


def _loaded(pair):
    model, tokenizer = load(str(pair["target_path"]))
    draft, _ = load(str(pair["draft_path"]))
    tokenizer.eos_token_ids = []  # every loop runs the full length
    return model, tokenizer, draft


def test_the_converter_reads_zlab_layout(pair):
    """z-lab's bare codebook tensors load (converted, or straight from the folder) as the same DFlash2 drafter."""
    converted, _ = load(str(pair["draft_path"]))
    direct, _ = load(str(pair["hf_draft"]))
    assert type(converted) is type(direct) is dflash2.Model
    theirs = {name: value.detach().numpy() for name, value in pair["draft"].state_dict().items()}
    for ours in (converted, direct):
        parameters = dict(tree_flatten(ours.parameters()))
        assert set(parameters) == set(theirs)
        for name, value in parameters.items():
            np.testing.assert_array_equal(np.array(value), theirs[name], err_msg=name)


def test_drafter_hidden_states_and_selected_paths_match_reference(pair):
    model, _, draft = _loaded(pair)
    head = dflash_strategy.DraftHead(draft, dflash_strategy.bind_target(draft, model))
    rng = np.random.default_rng(0)
    features = len(harness.TARGET_LAYER_IDS) * draft.hidden_size
    # A prompt's context rows, then partly accepted blocks' (one row, several), then a shrunk block.
    shapes = [(7, BLOCK), (3, BLOCK), (1, BLOCK), (5, 4)]
    calls = [
        {
            "features": rng.standard_normal((1, rows, features)).astype(np.float32),
            "block_embeddings": rng.standard_normal((1, size, draft.hidden_size)).astype(np.float32),
        }
        for rows, size in shapes
    ]
    theirs = reference.draft_forward(pair["draft"], calls)
    cache = draft.make_cache()
    for call, their_hidden in zip(calls, theirs):
        hidden = draft(mx.array(call["block_embeddings"]), mx.array(call["features"]), cache)
        np.testing.assert_allclose(np.array(hidden), their_hidden.numpy(), rtol=TOLERANCE, atol=TOLERANCE)
        for anchor in rng.integers(0, harness.VOCAB, size=3).tolist():
            their_path = reference.selected_path(pair["draft"], pair["target"], their_hidden[:, 1:], anchor)
            assert head(hidden[0, 1:], anchor).tolist() == their_path
            assert head(mx.array(their_hidden[0, 1:].numpy()), anchor).tolist() == their_path  # the selector alone
    assert all(layer.offset == sum(rows for rows, _ in shapes) for layer in cache)  # context rows only


def _our_run(pair, monkeypatch):
    model, tokenizer, draft = _loaded(pair)
    proposals = record_chain_proposals(monkeypatch)
    responses = list(
        stream_generate(model, tokenizer, PROMPT, MAX_TOKENS, draft_model=draft, speculation="chain")
    )
    monkeypatch.undo()
    return [t for r in responses for t in r.tokens], proposals


def test_greedy_tokens_and_proposals_match_the_pytorch_loop(pair, monkeypatch):
    from dflash.model import dflash_generate

    draft = pair["draft"]
    proposals, propose = [], draft.propose

    def recording(*args):
        path, candidates, probabilities = propose(*args)
        proposals.append(path[0].tolist())
        return path, candidates, probabilities

    monkeypatch.setattr(draft, "propose", recording, raising=False)
    ids = torch.tensor([PROMPT], device=harness.DEVICE)
    output = dflash_generate(draft, pair["target"], ids, MAX_TOKENS, stop_token_ids=None, temperature=0.0)
    monkeypatch.undo()
    expected = output[0, len(PROMPT) :].tolist()
    tokens, ours = _our_run(pair, monkeypatch)
    assert len(tokens) == MAX_TOKENS and tokens == expected
    assert len(ours) >= 10 and ours == proposals  # the selector's path, round after round


def test_greedy_tokens_and_proposals_match_the_mlx_loop(pair, monkeypatch):
    zlab = pytest.importorskip("dflash.model_mlx")
    model, tokenizer, ours = _loaded(pair)
    args = ours.args
    config = zlab.DFlashConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position_embeddings,
        block_size=BLOCK,
        target_layer_ids=tuple(args.target_layer_ids),
        num_target_layers=4,
        mask_token_id=args.mask_token_id,
        **reference.SELECTOR,
    )
    proposals = []

    class Recording(zlab.DFlash2DraftModel):
        def propose(self, *args, **kwargs):
            path, candidates, probabilities = super().propose(*args, **kwargs)
            proposals.append(path[0].tolist())
            return path, candidates, probabilities

    theirs = Recording(config)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)  # our names are z-lab's MLX names
    their_target, _ = load(str(pair["target_path"]))  # z-lab patches its target's layers in place
    responses = list(zlab.stream_generate(their_target, theirs, tokenizer, PROMPT, max_tokens=MAX_TOKENS))
    expected = [t for r in responses for t in r.tokens]
    tokens, mine = _our_run(pair, monkeypatch)
    assert len(tokens) == MAX_TOKENS and tokens == expected
    assert len(mine) >= 10 and mine == proposals
