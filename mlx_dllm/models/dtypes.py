"""Which dtype a layer computes in, so that nothing added to it promotes it to float32."""

import mlx.nn as nn


def compute_dtype(layer: nn.Module):
    """The dtype of a (possibly quantized) linear or embedding layer's outputs."""
    return layer.scales.dtype if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) else layer.weight.dtype
