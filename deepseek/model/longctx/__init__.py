"""Hierarchical attention compression for 128K-token contexts (docs/long_context.md).

The MLA latent cache, with sinks + a sliding window at full precision, older blocks summarised (min/max/mean
of the latent) for Quest-style top-k selection and coarse attention, their full latent quantised to 2/4/8 bits
and optionally held in host memory; plus chunked prefill with bounded memory and YaRN context extension.
"""

from .cache import CompressedLatentCache
from .learned import NSAParams, compressed_pattern, enable_learned, nsa_parameters
from .prefill import chunked_prefill, extend_context, make_cache
from .quant import dequantize, quantize

__all__ = ["CompressedLatentCache", "NSAParams", "chunked_prefill", "compressed_pattern", "dequantize",
           "enable_learned", "extend_context", "make_cache", "nsa_parameters",
           "quantize"]  # fmt: skip
