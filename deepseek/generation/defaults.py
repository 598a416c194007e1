"""The model's sampling defaults: one source (its generation_config.json) for the CLI, the SDK, the API and
the playground.

    d = sampling_defaults(model)        # SamplingDefaults(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=512)

A model folder without generation_config.json gets transformers' defaults for it: greedy (do_sample false).
temperature 0 means greedy everywhere in this project. `use_mtp_default(model)`: whether greedy decoding
drafts with the MTP layer (transformers' GenerationConfig.use_mtp; unset = no); `mtp_draft_tokens(model)`: how
many drafts per step (the config's `mtp_draft_tokens`, else MTP_DRAFT_TOKENS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# drafts per speculative step when the generation config names none: one, all an MTP layer trained at depth 1
# (mtp_loss) drafts well; the bundled r1-tiny's layer was also trained re-applied (train/mtp_distill.py) and its
# generation_config.json says 3 (docs/decode.md)
MTP_DRAFT_TOKENS = 1
FALLBACK_MAX_NEW_TOKENS = 512  # when the generation config names neither max_new_tokens nor a usable max_length


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    max_new_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def sampling_defaults(model) -> SamplingDefaults:
    """Unset fields resolve as transformers' generate resolves them (do_sample false, temperature 1, top_p 1,
    top_k 50), so `R1Model.generate` and every other front end sample the same way."""
    gc = model.generation_config
    base = gc._get_default_generation_params()

    def get(name):
        value = getattr(gc, name, None)
        return base[name] if value is None else value

    if not get("do_sample"):
        return SamplingDefaults(0.0, 1.0, 0, int(gc.max_new_tokens or FALLBACK_MAX_NEW_TOKENS))
    return SamplingDefaults(float(get("temperature")), float(get("top_p")), int(get("top_k") or 0),
                            int(gc.max_new_tokens or FALLBACK_MAX_NEW_TOKENS))  # fmt: skip


def use_mtp_default(model) -> bool:
    """generation_config.use_mtp: speculative decoding with the MTP layer (deepseek/generation/speculative.py)."""
    return bool(getattr(model.generation_config, "use_mtp", None))


def mtp_draft_tokens(model) -> int:
    """Drafts per speculative step: generation_config.mtp_draft_tokens, else MTP_DRAFT_TOKENS."""
    return int(getattr(model.generation_config, "mtp_draft_tokens", None) or MTP_DRAFT_TOKENS)
