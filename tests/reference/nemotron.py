"""PyTorch reference side for Nemotron-Labs-Diffusion (NLD): a tiny random checkpoint and three generators.

The backbone is transformers' own `Ministral3Model` (YaRN RoPE and the Llama-4 query scale come from it) plus
an untied `diffusion_head`, saved in the NLD layout (`encoder.*`, `diffusion_head.weight`) with a PEFT LoRA
on `o_proj` in `linear_spec_lora/`. The generators are written from the research dossier's description of
the released remote code (greedy, batch 1):

* `ar_generate`: causal prefill, then one causal forward per token.
* `diffusion_generate`: HF `generate` (causal_context=True): causal prefill gives a seed; each block
  `[seed, MASK x (B-1)]` is denoised by bidirectional forwards that do not write the cache (top-1 plus every
  mask with confidence >= threshold, or the even `num_transfer` schedule), then a causal forward writes the
  block and gives the next seed.
* `linear_spec_generate`: HF `linear_spec_generate`: bidirectional draft with the LoRA, causal verify without
  it (writing the cache), longest accepted prefix plus a bonus token, crop.

Every forward states its attention mode and cache policy explicitly: `ReferenceNLD.forward`.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Ministral3Config, Ministral3Model
from transformers.cache_utils import DynamicCache

from .harness import DEVICE, save_tokenizer

VOCAB = 256
MASK_TOKEN_ID = 100
EOS_TOKEN_ID = 11
BOS_TOKEN_ID = 1
BLOCK_SIZE = 8
INIT_RANGE = 0.2  # with HEAD_GAIN: peaked logits, so thresholds commit several tokens per step
HEAD_GAIN = 6.0  # the head std is HEAD_GAIN * initializer_range (logits std ~ 8)
LORA_R = 8
LORA_ALPHA = 32  # alpha / r = 4, like the real adapter (r 128, alpha 512)
ROPE_PARAMETERS = {
    "rope_type": "yarn",
    "rope_theta": 1e6,
    "factor": 16.0,
    "original_max_position_embeddings": 64,  # small, so YaRN and the Llama-4 q-scale (pos >= 64) matter
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
TEXT_CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # != hidden / heads (16)
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 1024,
    "sliding_window": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": None,  # Ministral3Config defaults pad to 11 (= EOS), which would zero the EOS embedding row
    "initializer_range": INIT_RANGE,
}

Ids = Sequence[int] | torch.Tensor


@dataclass
class ReferenceNLD:
    """The torch backbone, the untied head and the LoRA tensors; `forward` is the one entry point."""

    encoder: Ministral3Model
    diffusion_head: torch.nn.Linear
    lora: dict[int, tuple]  # layer -> (A [r, in], B [out, r])
    lora_scale: float
    config: Ministral3Config
    nld_config: dict
    _lora_on: bool = field(default=False, repr=False)

    def __post_init__(self):
        for i, layer in enumerate(self.encoder.layers):
            layer.self_attn.o_proj.register_forward_hook(self._make_lora_hook(i))

    def _make_lora_hook(self, layer_idx: int):
        def hook(module, inputs, output):
            if not self._lora_on:
                return output
            A, B = self.lora[layer_idx]
            x = inputs[0]
            return output + self.lora_scale * (x @ A.T @ B.T)

        return hook

    @property
    def mask_token_id(self) -> int:
        return self.nld_config["mask_token_id"]

    @property
    def eos_token_id(self) -> int:
        return self.nld_config["eos_token_id"]

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.no_grad()
    def forward(
        self,
        ids: Ids,
        cache: DynamicCache,
        mode: str = "causal",
        write_cache: bool = True,
        lora: bool = False,
        positions: Sequence[int] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [L, V] (float32, CPU) for `ids` after the cached tokens.

        mode "causal": transformers' own causal mask (lower-right aligned over cache + new);
        "bidirectional": an explicit all-zeros additive mask [1, 1, L, C+L] (every query sees every key);
        "custom": `mask`, a boolean [L, C+L] (True = visible), with optional explicit `positions`.
        Positions default to `C + arange(L)`. write_cache=False appends then crops back, which equals the
        reference's "concatenate for this forward only"."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=DEVICE).reshape(1, -1)
        L = ids.shape[1]
        C = cache.get_seq_length()
        if positions is None:
            position_ids = torch.arange(C, C + L, device=DEVICE)[None]
        else:
            position_ids = torch.as_tensor(positions, dtype=torch.long, device=DEVICE).reshape(1, L)
        dtype = self.encoder.embed_tokens.weight.dtype
        if mode == "causal":
            attention_mask = None  # Ministral3Model builds the causal mask against the cache
        elif mode == "bidirectional":
            attention_mask = torch.zeros(1, 1, L, C + L, dtype=dtype, device=DEVICE)
        elif mode == "custom":
            allowed = torch.as_tensor(mask, device=DEVICE).bool().reshape(1, 1, L, C + L)
            attention_mask = torch.zeros(allowed.shape, dtype=dtype, device=DEVICE)
            attention_mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        self._lora_on = lora
        try:
            hidden = self.encoder(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        finally:
            self._lora_on = False
        if not write_cache:
            cache.crop(-L)  # transformers 5.x: a negative count of tokens to remove
        assert cache.get_seq_length() == C + (L if write_cache else 0)
        return self.diffusion_head(hidden)[0].float().cpu()

    __call__ = forward


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Crop to an absolute length (HF `_crop_dynamic_cache`); `DynamicCache.crop` takes -tokens_to_remove."""
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {length}")
    if remove:
        cache.crop(-remove)


def nld_config_dict(text: Ministral3Config, block_size: int, mask_token_id: int) -> dict:
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "hidden_act": text.hidden_act,
        "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": text.max_position_embeddings,
        "rope_parameters": dict(ROPE_PARAMETERS),
        "sliding_window": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": text.initializer_range,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": "float32",
        "use_cache": False,
        "mask_token_id": mask_token_id,
        "block_size": block_size,
        "dlm_paradigm": "bidirectional",
        "ar_loss_weight": 1.0,
        "dlm_loss_weight": None,
        "dp_varying_mask_ratio": False,
    }


@torch.no_grad()
def build_checkpoint(
    out_dir: Path | None = None,
    seed: int = 0,
    block_size: int = BLOCK_SIZE,
    mask_token_id: int = MASK_TOKEN_ID,
    lora_r: int = LORA_R,
    lora_alpha: int = LORA_ALPHA,
    lora_gain: float = 1.0,
    head_gain: float = HEAD_GAIN,
    **overrides,
) -> ReferenceNLD:
    """A tiny random NLD checkpoint; `overrides` go to the Ministral3 text config (e.g. rope_parameters)."""
    text = dict(TEXT_CONFIG, rope_parameters=dict(ROPE_PARAMETERS))
    text.update(overrides)
    config = Ministral3Config(**text)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    encoder = Ministral3Model(config).to(DEVICE).eval()
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).to(DEVICE).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    head.weight.copy_(head_gain * config.initializer_range * torch.randn(head.weight.shape, generator=generator))
    for name, tensor in encoder.named_parameters():
        if name.endswith("norm.weight"):  # away from ones, so a missed norm shows in the logits
            tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=generator))
    lora = {}
    for i, layer in enumerate(encoder.layers):
        o_proj = layer.self_attn.o_proj
        A = torch.randn(lora_r, o_proj.in_features, generator=generator) / o_proj.in_features**0.5
        B = lora_gain * 0.05 * torch.randn(o_proj.out_features, lora_r, generator=generator)
        lora[i] = (A.to(DEVICE), B.to(DEVICE))
    nld_config = nld_config_dict(config, block_size, mask_token_id)
    ref = ReferenceNLD(encoder, head, lora, lora_alpha / lora_r, config, nld_config)
    if out_dir is not None:
        save_checkpoint(ref, Path(out_dir), lora_r, lora_alpha)
    return ref


TEXT_KEYS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "rope_parameters", "sliding_window", "attention_bias", "tie_word_embeddings", "initializer_range",
    "bos_token_id", "eos_token_id",
]


@torch.no_grad()
def load_checkpoint(folder: Path) -> ReferenceNLD:
    """Rebuild a ReferenceNLD from a saved NLD folder (weights, config and `linear_spec_lora/`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    nld_config = json.loads((folder / "config.json").read_text())
    config = Ministral3Config(**{k: nld_config[k] for k in TEXT_KEYS if k in nld_config}, pad_token_id=None)
    config._attn_implementation = "sdpa"
    encoder = Ministral3Model(config).to(DEVICE).eval()
    weights = load_file(folder / "model.safetensors")
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")})
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).to(DEVICE).eval()
    head.weight.copy_(weights["diffusion_head.weight"])
    adapter = json.loads((folder / "linear_spec_lora" / "adapter_config.json").read_text())
    tensors = load_file(folder / "linear_spec_lora" / "adapter_model.safetensors")
    lora = {}
    for i in range(config.num_hidden_layers):
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        lora[i] = (tensors[f"{prefix}.lora_A.weight"].to(DEVICE), tensors[f"{prefix}.lora_B.weight"].to(DEVICE))
    return ReferenceNLD(encoder, head, lora, adapter["lora_alpha"] / adapter["r"], config, nld_config)


def save_checkpoint(ref: ReferenceNLD, out_dir: Path, lora_r: int, lora_alpha: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in ref.encoder.state_dict().items()}
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    weights["diffusion_head.weight"] = ref.diffusion_head.weight.detach().cpu().contiguous()
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(ref.nld_config, indent=2))
    generation = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_tokenizer(out_dir)
    lora_dir = out_dir / "linear_spec_lora"
    lora_dir.mkdir(exist_ok=True)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": ["o_proj"],
        "r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    tensors = {}
    for i, (A, B) in ref.lora.items():
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().cpu().float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().cpu().float().contiguous()
    save_file(tensors, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------- generators


def _argmax(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def _truncate_after_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def num_transfer_tokens(mask_count: int, steps: int) -> list[int]:
    """HF `_get_num_transfer_tokens`: an even split, the remainder front-loaded."""
    base, remainder = divmod(mask_count, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


@torch.no_grad()
def ar_generate(ref: ReferenceNLD, prompt: Sequence[int], max_new_tokens: int, eos_id: int | None = None):
    """Greedy causal decoding. stats: nfe (decode forwards; HF `ar_generate` does not count the prefill) and
    nfe_total (with the prefill)."""
    cache = ref.new_cache()
    logits = ref.forward(list(prompt), cache, "causal", write_cache=True)
    out: list[int] = []
    nfe = 0
    while True:
        token = int(logits[-1].argmax())
        out.append(token)
        if (eos_id is not None and token == eos_id) or len(out) >= max_new_tokens:
            break
        logits = ref.forward([token], cache, "causal", write_cache=True)
        nfe += 1
    return out, {"nfe": nfe, "nfe_total": nfe + 1}


@torch.no_grad()
def diffusion_generate(
    ref: ReferenceNLD,
    prompt: Sequence[int],
    max_new_tokens: int,
    block_length: int,
    threshold: float | None = 0.9,
    mask_id: int = MASK_TOKEN_ID,
    eos_id: int | None = None,
    causal_context: bool = True,
):
    """HF `generate` (greedy, batch 1). Returns (new tokens, stats) with stats
    nfe (denoise steps + one commit per block; the prefill is not counted, as in HF), nfe_total (with the
    prefill), steps_per_block (denoise forwards per block), commits (per block, per step: the block-relative
    positions committed, sorted), blocks (the finished block tokens), seeds (the seed of each block)."""
    if not causal_context:
        raise NotImplementedError("causal_context=False (bidirectional prompt encoding) is not implemented")
    assert max_new_tokens % block_length == 0, "max_new_tokens must be a multiple of block_length (as HF)"
    steps = block_length  # hard-coded in HF
    cache = ref.new_cache()
    logits = ref.forward(list(prompt), cache, "causal", write_cache=True)
    seed = int(logits[-1].argmax())
    out: list[int] = []
    nfe = 0
    stats = {"steps_per_block": [], "commits": [], "blocks": [], "seeds": []}
    for _ in range(max_new_tokens // block_length):
        block = [seed] + [mask_id] * (block_length - 1)
        stats["seeds"].append(seed)
        schedule = num_transfer_tokens(sum(t == mask_id for t in block), steps)
        block_commits = []
        for step in range(steps):
            masked = [i for i, t in enumerate(block) if t == mask_id]
            if not masked:
                break
            logits = ref.forward(block, cache, "bidirectional", write_cache=False)
            nfe += 1
            x0 = logits.argmax(dim=-1)  # the mask id itself may win, as in HF
            conf = torch.softmax(logits, dim=-1).gather(-1, x0[:, None])[:, 0]  # full vocabulary
            order = sorted(masked, key=lambda i: (-float(conf[i]), i))
            if threshold is None:
                chosen = order[: schedule[step]]
            else:
                chosen = order[:1] + [i for i in order[1:] if float(conf[i]) >= threshold]
            for i in chosen:
                block[i] = int(x0[i])
            block_commits.append(sorted(chosen))
            if eos_id is not None and eos_id in block:
                first = block.index(eos_id)
                if mask_id not in block[:first]:
                    break
        stats["steps_per_block"].append(len(block_commits))
        stats["commits"].append(block_commits)
        stats["blocks"].append(list(block))
        logits = ref.forward(block, cache, "causal", write_cache=True)  # the commit writes the block
        nfe += 1
        seed = int(logits[-1].argmax())
        out.extend(block)
        if eos_id is not None and eos_id in block:
            out = _truncate_after_eos(out, eos_id)
            break
    stats["nfe"] = nfe
    stats["nfe_total"] = nfe + 1
    return out, stats


@torch.no_grad()
def linear_spec_generate(
    ref: ReferenceNLD,
    prompt: Sequence[int],
    max_new_tokens: int,
    block_length: int,
    lora: bool = True,
    threshold: float = 0.0,
    mask_id: int = MASK_TOKEN_ID,
    eos_id: int | None = None,
):
    """HF `linear_spec_generate` (greedy, batch 1). Returns (new tokens, stats) with stats
    nfe (prefill 1 + every draft and verify forward, as HF), cycles, accepted (tokens emitted per cycle =
    confirmed drafts + the bonus), draft_steps (draft forwards per cycle), commits (per cycle, per draft step:
    the block positions filled), drafts (each cycle's full drafted block)."""
    cache = ref.new_cache()
    logits = ref.forward(list(prompt), cache, "causal", write_cache=True, lora=False)
    nfe = 1
    seed = int(logits[-1].argmax())
    out = [seed]
    stats = {"accepted": [], "draft_steps": [], "commits": [], "drafts": []}
    done = eos_id is not None and seed == eos_id
    while not done and len(out) < max_new_tokens:
        cache_len = cache.get_seq_length()
        block = [seed] + [mask_id] * (block_length - 1)
        # draft: bidirectional with the LoRA, cache untouched
        draft_commits = []
        for _ in range(block_length):
            masked = [i for i, t in enumerate(block) if t == mask_id]
            if not masked:
                break
            logits = ref.forward(block, cache, "bidirectional", write_cache=False, lora=lora)
            nfe += 1
            x0 = logits.argmax(dim=-1)
            if threshold <= 0:
                chosen = masked
            else:
                conf = torch.softmax(logits, dim=-1).gather(-1, x0[:, None])[:, 0]
                chosen = [i for i in masked if float(conf[i]) >= threshold]
                if not chosen:
                    chosen = [max(masked, key=lambda i: (float(conf[i]), -i))]
            for i in chosen:
                block[i] = int(x0[i])
            draft_commits.append(sorted(chosen))
            if threshold <= 0:
                break
        stats["draft_steps"].append(len(draft_commits))
        stats["commits"].append(draft_commits)
        stats["drafts"].append(list(block))
        # verify: causal without the LoRA, writing the cache
        logits = ref.forward(block, cache, "causal", write_cache=True, lora=False)
        nfe += 1
        ar = _argmax(logits)
        c = 0
        while c < block_length - 1 and ar[c] == block[c + 1]:
            c += 1
        accepted = c + 1
        crop_cache(cache, cache_len + accepted)
        emitted = ar[:accepted]
        stats["accepted"].append(accepted)
        if eos_id is not None and eos_id in emitted:
            emitted = _truncate_after_eos(emitted, eos_id)
            done = True
        out.extend(emitted)
        seed = emitted[-1]
    stats["nfe"] = nfe
    stats["cycles"] = len(stats["accepted"])
    return out[:max_new_tokens], stats
