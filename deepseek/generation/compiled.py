"""The compiled decode step: the model's own one-token forward, traced once by torch.compile.

    out = generate(model, ids_BT, max_new_tokens=128, compile=True)     # R1Model.generate(..., compile=True),
                                                                        # deepseek generate|chat --compile
Legend: L layers, B batch, M allocated cache positions, C kv_lora_rank, R qk_rope_head_dim, V vocab.

What is compiled: `model.model` + `lm_head` for one token per row over `StepCache`, a static-shape view of a
`LatentCache`: the step writes its latent at a position held in a tensor and every query attends to all M
allocated positions under a (B, M) mask of the positions written so far (left padding stays masked). No shape
changes from one step to the next, so one graph serves every step of every request of that batch size and M.

Inductor settings (`OPTIONS`): weights frozen into the graph as constants, and matmuls autotuned between
inductor's C++ GEMM template and ATen (the template alone has no valid choice for some small shapes): on this
2-core CPU a one-row product over a 32000 x 512 fp32 head runs at ~50 GB/s against ~14 GB/s for MKL's GEMV,
and the elementwise work between matmuls is fused. The MoE runs as `experts_gathered` or the
`deepseek::grouped_experts` custom op (model/moe.py). Compiling costs 30-50 s on the 88M benchmark config and
on r1-tiny once inductor's autotuning cache is warm, 1-2 min cold (freezing bypasses its on-disk graph cache),
once per (model, batch size, M), and is reported apart from decoding (`out.stats["compile_seconds"]`); M is
rounded up to a power of two (>= 256) so requests of different lengths share graphs.

Frozen weights go stale if the model changes: when any parameter's version counter has moved (an optimizer
step, load_state_dict, a LoRA merge) the decoder is rebuilt. Each decoder compiles its own copy of the
forward's code object, because torch.compile keeps graphs per code object: with one shared code object the
same model after a weight update passes the old graph's guards and runs its frozen constants (a test failed
that way). A deepcopy of a model gets a decoder of its own too.

The eager step (loop.decode_one_token on the same LatentCache) is the reference; tests compare greedy tokens
and logits. Plain top-k routing only; adaptive routing (variable k) and MTP drafting stay eager.
"""

from __future__ import annotations

import itertools
import time
import types

import torch
from torch._inductor import config as inductor_config

from ..model.cache import Attended, KeyGroup, LatentCache
from ..model.moe import moe_layers

OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
MIN_POSITIONS = 256


def cache_positions(n: int) -> int:
    """The M a compiled decoder allocates for n positions: a power of two, at least MIN_POSITIONS."""
    return max(MIN_POSITIONS, 1 << (n - 1).bit_length())


class StepCache:
    """One decode step's view of a LatentCache (the cache protocol, static shapes): writes each layer's new
    latent at `slot_1` and returns every allocated position under the `valid_BM` mask."""

    def __init__(self, kv_LBMC, pe_LBMR, valid_BM, slot_1):
        self.kv, self.pe, self.valid, self.slot = kv_LBMC, pe_LBMR, valid_BM, slot_1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("the compiled step passes position_ids; its cache length lives in a tensor")

    def attended(self, layer_idx, kv_BTC, pe_BTR, query, mask_BTS) -> Attended:
        self.kv[layer_idx].index_copy_(1, self.slot, kv_BTC)
        self.pe[layer_idx].index_copy_(1, self.slot, pe_BTR)
        return Attended([KeyGroup(self.kv[layer_idx], self.pe[layer_idx], self.valid[:, None, None, :])])

    def finish(self, layer_idx: int, block_weights_b=None) -> None:
        return None


def pays_off(config, batch: int) -> bool:
    """Whether the compiled step is the faster one at this batch size: while a step's expert assignments fit
    in the experts (B * K <= E, the gathered MoE). Past that the compiled MoE is the same grouped matmul and the
    compiled GEMMs lose to MKL's on more rows (88M config, 2 cores: 2.1x at batch 1, 2.0x at 4, 1.6x at 8 with
    the gathered MoE; 0.7x at 16 with the grouped op), so generate decodes eagerly there."""
    if not config.n_routed_experts:
        return True
    return batch * config.num_experts_per_tok <= config.n_routed_experts


def _versions(model) -> int:
    return sum(p._version for p in model.parameters())


def check_compilable(model, cache) -> None:
    """One-line errors before any compiling."""
    if not isinstance(cache, LatentCache):
        raise ValueError(f"compile=True decodes on the static LatentCache, not {type(cache).__name__}")
    if any(moe.gate.adaptive is not None for _, moe in moe_layers(model)):
        raise ValueError("compile=True supports plain top-k routing; this model routes adaptively (variable k)")
    if getattr(model.config, "weight_quantization", None):
        raise ValueError("compile=True decodes float weights; int8 weights decode eagerly (compiled int8 measured "
                         "slower on this CPU: 55-62 tok/s against 97 for compiled fp32 on the 88M config)")  # fmt: skip
    if model.config.indexer is not None or model.config.compression.learned:
        raise ValueError("compile=True supports MLA on the dense latent cache (no V3.2 indexer, no learned compression)")


class CompiledDecoder:
    """model -> a compiled `step(token_B, position_B, cache, valid_BM) -> logits_BV`."""

    def __init__(self, model):
        self.model = model
        self.versions = _versions(model)
        self.owner = id(model)
        # its own code object: torch.compile keeps graphs per code object, and the same model after a weight
        # update passes the old graph's guards, which would then run the old frozen constants
        self.fn = torch.compile(types.MethodType(_own_code(CompiledDecoder._forward), self), fullgraph=True,
                                dynamic=False)  # fmt: skip
        self.shapes: set[tuple[int, int]] = set()  # (B, M) graphs compiled so far
        self.compile_seconds = 0.0  # the last step's compiling time (0 when its graph existed)

    def _forward(self, token_B, position_B, slot_1, valid_BM, kv_LBMC, pe_LBMR):
        cache = StepCache(kv_LBMC, pe_LBMR, valid_BM, slot_1)
        out = self.model.model(input_ids=token_B[:, None], position_ids=position_B[:, None], cache=cache)
        return self.model.lm_head(out.last_hidden_state[:, -1])

    def step(self, token_B, position_B, cache: LatentCache, valid_BM) -> torch.Tensor:
        """Decode one token per row into `cache` (its next position, the same for every row); valid_BM marks
        the positions written so far and gains this one."""
        slot = cache.lengths[0]
        if slot >= cache.max_len:
            raise ValueError(f"the latent cache is full: {slot + 1} positions needed, {cache.max_len} allocated")
        valid_BM[:, slot] = True
        slot_1 = torch.tensor([slot], device=token_B.device)
        new_shape = (token_B.shape[0], cache.max_len) not in self.shapes
        t = time.perf_counter()
        with inductor_config.patch(OPTIONS):  # compiling happens inside the first call (and on a new shape)
            logits = self.fn(token_B, position_B.clone(), slot_1, valid_BM, cache.kv, cache.pe)
        self.compile_seconds = time.perf_counter() - t if new_shape else 0.0
        self.shapes.add((token_B.shape[0], cache.max_len))
        cache.lengths = [slot + 1] * len(cache.lengths)
        return logits


def decoder_for(model) -> CompiledDecoder:
    """The model's compiled decoder (kept on the model), rebuilt when its weights changed since it was compiled."""
    decoder = model.__dict__.get("_compiled_decoder")
    if decoder is None or decoder.owner != id(model) or decoder.versions != _versions(model):  # (owner: a deepcopy)
        decoder = model.__dict__["_compiled_decoder"] = CompiledDecoder(model)
    return decoder


def _own_code(fn):
    """fn with a code object of its own (same body)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_serial)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_serial = itertools.count()
