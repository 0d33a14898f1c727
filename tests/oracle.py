"""Stand-ins around DFlash's chain proposals: a drafter whose proposals are known (right for the first k positions of
a block, then wrong), and a recorder of the real ones."""

import mlx.core as mx


class Oracle:
    """Replaces `propose_block`: the true greedy continuation for the first k positions of each block
    (k cycling through `pattern`), then a wrong token, so rounds accept all, none or part of a block.
    The real drafter still runs, so its cache behaves as in a real run."""

    def __init__(self, propose_block, reference, prompt_length, pattern, vocab_size):
        self.propose_block, self.reference, self.prompt_length = propose_block, reference, prompt_length
        self.pattern, self.vocab_size = pattern, vocab_size
        self.expected_accepts = []

    def __call__(self, draft, target, anchor, features, draft_cache, size, head):
        self.propose_block(draft, target, anchor, features, draft_cache, size, head)
        anchor_index = draft_cache[0].offset - self.prompt_length  # context rows = tokens before the anchor
        correct = self.pattern[len(self.expected_accepts) % len(self.pattern)]
        # A round commits at most what max_tokens (the reference's length) leaves: the last one may be cut.
        remaining = len(self.reference) - anchor_index - 1
        self.expected_accepts.append(min(correct + 1, size, remaining))
        truth = self.reference[anchor_index + 1 : anchor_index + size]
        return mx.array([t if j < correct else (t + 1) % self.vocab_size for j, t in enumerate(truth)])


def record_chain_proposals(monkeypatch):
    """The list each chain round's proposals (token ids) are appended to, from the real drafter."""
    from mlx_dllm.sampler import dflash

    proposals, propose_block = [], dflash.propose_block

    def recording(*args):
        proposal = propose_block(*args)
        proposals.append(proposal.tolist())
        return proposal

    monkeypatch.setattr(dflash, "propose_block", recording)
    return proposals


def tiny_pairs(tmp_path_factory):
    """name -> (target, tokenizer, drafter) for the tiny DFlash and DFlash2 pairs, and name-folder -> the drafter's
    folder; EOS never stops a run."""
    import mlx_dllm
    from mlx_dllm.benchmark.tiny import build_tiny

    result = {}
    for name in ("dflash", "dflash2"):
        target, draft = build_tiny(name, tmp_path_factory.mktemp(name))
        model, tokenizer = mlx_dllm.load(str(target))
        tokenizer._eos_token_ids = set()
        result[name] = (model, tokenizer, mlx_dllm.load(str(draft))[0])
        result[f"{name}-folder"] = draft
    return result
