"""Hierarchical attention compression for 128K-token contexts (docs/long_context.md).

The MLA latent cache, with sinks + a sliding window at full precision, older blocks summarised (min/max/mean
of the latent) for Quest-style top-k selection and coarse attention, their full latent quantised to 2/4/8 bits
and optionally held in host memory; plus chunked prefill with bounded memory and YaRN context extension.
"""

from .cache import CompressedLatentCache
from .prefill import chunked_prefill, extend_context, generate_long, make_cache
from .quant import dequantize, quantize

__all__ = ["CompressedLatentCache", "chunked_prefill", "dequantize", "extend_context", "generate_long",
           "make_cache", "quantize"]  # fmt: skip
