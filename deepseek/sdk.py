"""R1Model: the SDK class (`from deepseek import R1Model`): the model plus fine-tuning and fast generation.

    from deepseek import R1Model
    model = R1Model.from_pretrained("deepseek/r1-base")
    model.finetune(dataset="custom_data", epochs=5)
    out = model.generate(ids_BT, attention_mask=mask_BT, max_new_tokens=64)   # transformers-style call

`generate` takes transformers' arguments and the model's generation_config.json defaults, and runs them on
our generation loop (static latent cache, absorbed MLA decode; deepseek/generation/loop.py). Greedy tokens
equal transformers' own `generate`. What the loop does not do (beam search, logits processors, scores in the
output, penalties, ...) goes to transformers' GenerationMixin, with a one-time note saying why.
"""

from __future__ import annotations

import logging

import torch

from .model.transformer import R1ForCausalLM

logger = logging.getLogger(__name__)

# generation settings the loop implements; any other that differs from transformers' default goes to GenerationMixin
LOOP_SETTINGS = {"max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                 "pad_token_id", "bos_token_id", "use_cache", "decoder_start_token_id"}  # fmt: skip
LOOP_INPUTS = {"attention_mask", "use_cache"}


class R1Model(R1ForCausalLM):
    def finetune(self, dataset, epochs: int = 1, **kwargs) -> dict:
        """LoRA (default) or full fine-tuning on a path / dataset name / datasets.Dataset; see deepseek.train.finetune."""
        from .train.finetune import finetune

        return finetune(self, dataset, epochs=epochs, **kwargs)

    def generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
        """transformers' `generate` signature; returns the (B, T + n) sequences (finished rows padded)."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        reason = self.loop_unsupported(input_ids, config, kwargs)
        if reason is not None:
            if not getattr(self, "_noted_fallback", False):
                logger.warning("R1Model.generate: %s; using transformers' GenerationMixin (slower)", reason)
                self._noted_fallback = True
            return super().generate(input_ids, generation_config=generation_config, streamer=streamer, **kwargs)
        T = input_ids.shape[1]
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - T
        if max_new <= 0:
            raise ValueError(f"nothing to generate: the prompt has {T} tokens and max_length is {config.max_length}; "
                             "pass max_new_tokens")  # fmt: skip
        eos = config.eos_token_id
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        pad = config.pad_token_id if config.pad_token_id is not None else (eos_list[0] if eos_list else 0)
        on_token = None
        if streamer is not None:
            streamer.put(input_ids.cpu())

            def on_token(step, token_B):
                streamer.put(token_B.cpu())

        from .generation.loop import generate

        out = generate(self, input_ids, model_kwargs.get("attention_mask"), max_new_tokens=max_new,
                       temperature=config.temperature if config.do_sample else 0.0, top_p=config.top_p,
                       top_k=config.top_k or 0, eos_token_id=eos_list, pad_token_id=pad, on_token=on_token)  # fmt: skip
        if streamer is not None:
            streamer.end()
        return out.sequences

    def loop_unsupported(self, input_ids, config, kwargs) -> str | None:
        """Why this call cannot run on the generation loop (None if it can). config: the resolved one."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return "input_ids must be a (batch, tokens) tensor for the fast path"
        other = set(kwargs) - LOOP_SETTINGS - LOOP_INPUTS
        if other:
            return f"arguments {sorted(other)} are not supported by the generation loop"
        defaults = config._get_default_generation_params()
        changed = [k for k, v in defaults.items() if k not in LOOP_SETTINGS and getattr(config, k, v) != v]
        if changed:
            return f"settings {sorted(changed)} are not supported by the generation loop"
        if config.do_sample and config.temperature is not None and config.temperature <= 0:
            return "do_sample with temperature <= 0"
        return None
