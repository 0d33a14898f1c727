"""PyTorch reference side for DiffusionGemma: tiny random `DiffusionGemmaForBlockDiffusion` checkpoints.

The weights are perturbed away from their ones/zeros initialisation (norms, router scales, encoder and
decoder layer scalars set apart) so that a mapping mistake shows up in the logits.
"""

from pathlib import Path
from typing import List, Optional

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

from .harness import DEVICE, save_tokenizer

VOCAB = 256  # covers the real EOS ids 1, 106 and 50
SLIDING_WINDOW = 8
CANVAS = 8
EMBED_GAIN = 24.0  # peaked logits: several positions are accepted per step and canvases stop early


def tiny_config(**text_overrides) -> DiffusionGemmaConfig:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        num_experts=4,
        top_k_experts=2,
        sliding_window=SLIDING_WINDOW,
        use_bidirectional_attention="vision",
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text.update(text_overrides)
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        position_embedding_size=64,
    )
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS)


@torch.no_grad()
def build_model(out_dir: Optional[Path] = None, seed: int = 0, embed_gain: float = EMBED_GAIN, **text_overrides):
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(**text_overrides)).to(DEVICE).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for name, tensor in model.named_parameters():
        if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
            tensor.copy_(1 + 0.3 * torch.randn(tensor.shape, generator=generator))
    model.model.decoder.embed_tokens.weight.mul_(embed_gain)  # the head is the embedding
    for name, buffer in model.named_buffers():
        if name.endswith("layer_scalar"):
            base = 1.3 if ".encoder." in name else 0.7  # encoder and decoder scalars must stay apart
            buffer.copy_(base + 0.1 * torch.randn(buffer.shape, generator=generator))
    if out_dir is not None:
        model.save_pretrained(out_dir)
        save_tokenizer(out_dir)
    return model


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config.text_config)


@torch.no_grad()
def encode(model, ids: List[int], cache: DynamicCache) -> None:
    model.model.encoder.language_model(input_ids=torch.tensor([ids], device=DEVICE), cache=cache)


@torch.no_grad()
def denoise(model, canvas: List[int], cache: DynamicCache, self_conditioning_logits=None) -> torch.Tensor:
    sc = None if self_conditioning_logits is None else torch.as_tensor(self_conditioning_logits, device=DEVICE)
    out = model(
        input_ids=None,
        cache=cache,
        decoder_input_ids=torch.tensor([canvas], device=DEVICE),
        self_conditioning_logits=sc,
    )
    return out.logits.float().cpu()


class RandomDrawRecorder:
    """Records, in order, every random draw of transformers' DiffusionGemma sampler and its accepted sets:
    ("noise", ids) for a fresh or re-noised canvas, ("draw", ids) for the per-position samples and
    ("accepted", mask) after each acceptance."""

    def __init__(self):
        self.events = []

    def __enter__(self):
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as generation

        sampler = generation.EntropyBoundSampler
        self._saved = (sampler.initialize_canvas, sampler.accept_canvas, torch.multinomial)
        initialize, accept, multinomial = self._saved
        events = self.events

        def initialize_canvas(this, batch_size, device):
            ids = initialize(this, batch_size, device)
            events.append(("noise", ids.cpu().tolist()))
            return ids

        def accept_canvas(this, *args, **kwargs):
            accepted = accept(this, *args, **kwargs)
            events.append(("accepted", this.accepted_token_mask.cpu().tolist()))
            return accepted

        def recorded_multinomial(probs, num_samples, *args, **kwargs):
            ids = multinomial(probs, num_samples, *args, **kwargs)
            events.append(("draw", ids.view(1, -1).cpu().tolist()))
            return ids

        sampler.initialize_canvas, sampler.accept_canvas, torch.multinomial = (
            initialize_canvas,
            accept_canvas,
            recorded_multinomial,
        )
        return self

    def __exit__(self, *exc):
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as generation

        generation.EntropyBoundSampler.initialize_canvas, generation.EntropyBoundSampler.accept_canvas = self._saved[:2]
        torch.multinomial = self._saved[2]


@torch.no_grad()
def generate(model, prompt: List[int], max_new_tokens: int, seed: int = 0, **knobs):
    """transformers' own DiffusionGemma generate (dynamic cache): the new tokens and the recorded draws.

    `entropy_bound` goes through `sampler_config`: as a plain keyword transformers would silently ignore it."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    if "entropy_bound" in knobs:
        knobs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(knobs.pop("entropy_bound")))
    torch.manual_seed(seed)
    with RandomDrawRecorder() as recorder:
        out = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=max_new_tokens, **knobs)
    return out.sequences[0, len(prompt) :].tolist(), float(out.tokens_per_forward[0]), recorder.events
