"""R1Model: the SDK class (`from deepseek import R1Model`): the model plus fine-tuning and fast generation.

    from deepseek import R1Model
    model = R1Model.from_pretrained("deepseek/r1-base")
    model.finetune(dataset="custom_data", epochs=5)
    out = model.generate(ids_BT, attention_mask=mask_BT, max_new_tokens=64)   # transformers-style call
    out = model.generate(ids_BT, max_new_tokens=64, use_mtp=True)             # MTP speculative decoding (greedy)
    reply = model.chat([{"role": "user", "content": "What is 48 + 27?"}])    # reply.answer, reply.reasoning

A checkpoint whose config has a "multimodal" section also takes images, audio and 3D points (encoders and
projectors in deepseek/multimodal/, weights in multimodal.safetensors next to the LM's):

    processor = model.processor()                       # or R1Processor.from_pretrained(folder)
    out = model.generate(**processor(text="<image> Which digit is this?", images=["seven.png"]), max_new_tokens=64)
    reply = model.chat([{"role": "user", "content": [{"type": "image", "image": "seven.png"},
                                                     {"type": "text", "text": "Which digit is this?"}]}])
    vectors = model.embed(text=["the digit seven"], images=["seven.png"])   # shared-space unit vectors

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
                 "pad_token_id", "bos_token_id", "use_cache", "decoder_start_token_id", "use_mtp"}  # fmt: skip
LOOP_INPUTS = {"attention_mask", "use_cache", "media"}


class R1Model(R1ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.multimodal = None  # MultimodalAdapter when the config has a "multimodal" section
        if config.multimodal:
            from .multimodal.lm import MultimodalAdapter

            self.multimodal = MultimodalAdapter(config.multimodal, config.hidden_size)

    # ------------------------------------------------------------------ multimodal inputs
    def media_embeds(self, input_ids: torch.Tensor, media: dict | None) -> torch.Tensor:
        """(B, T, D) input embeddings with `media` ({"image": [...], "audio": [...], "points": [...]}, items raw
        or decoded) spliced at the placeholder tokens. ValueError for a text model, bad media, or placeholders
        that do not match the items."""
        if self.multimodal is None:
            raise ValueError("this checkpoint is a text model (no multimodal encoders in its config.json): "
                             "it takes no images, audio or points")  # fmt: skip
        decoded = self.multimodal.decode(media)
        return self.multimodal.splice(self.model.embed_tokens(input_ids), input_ids, decoded)

    def forward(self, input_ids=None, *args, media=None, **kwargs):
        if media:
            if input_ids is None:
                raise ValueError("media needs input_ids holding the placeholder tokens")
            kwargs["inputs_embeds"] = self.media_embeds(input_ids, media)
            input_ids = None
        return super().forward(input_ids, *args, **kwargs)

    def processor(self, tokenizer=None):
        """The processor (text + media -> model inputs) for this model, with its tokenizer."""
        from .multimodal.processor import R1Processor

        return R1Processor(tokenizer if tokenizer is not None else self.tokenizer(), self.config.multimodal)

    def tokenizer(self):
        """The tokenizer saved next to the weights (cached)."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config._name_or_path)
        return self._tokenizer

    def embed(self, **inputs) -> dict[str, torch.Tensor]:
        """Shared-space unit vectors: embed(text=[...], images=[...], audio=[...], points=[...]) -> {modality: (n, C)}."""
        if self.multimodal is None:
            raise ValueError("this checkpoint is a text model: it has no shared-space encoders to embed with")
        with torch.inference_mode():
            return self.multimodal.embed(**inputs)

    def chat(self, messages, max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None, tokenizer=None, response_format=None,
             tools=None, tool_choice="required", use_mtp: bool | None = None):  # fmt: skip
        """One assistant turn for `messages` (a string, or OpenAI-style messages whose content may hold parts
        {"type": "text" | "image" | "audio" | "points", ...}). Returns deepseek.chat.Reply (reasoning, answer).
        Unset sampling settings come from the model's generation_config.json.
        response_format (a pydantic model class or a JSON schema dict): returns the validated object / dict;
        tools (OpenAI tool dicts or pydantic classes): returns [ToolCall]; both decode under a grammar
        (deepseek/structured_chat.py). use_mtp: MTP speculative decoding (greedy; default: generation_config.use_mtp)."""
        import time

        from .chat import Reply, split_reasoning
        from .generation.defaults import sampling_defaults, use_mtp_default
        from .generation.loop import generate

        d = sampling_defaults(self)
        use_mtp = use_mtp_default(self) if use_mtp is None else use_mtp
        tok = tokenizer if tokenizer is not None else self.tokenizer()
        structured = None
        if response_format is not None or tools:
            from .structured_chat import Structured

            structured = Structured(self, tok, messages, response_format, tools, tool_choice)
        inputs = self.processor(tok)(messages=messages) if self.multimodal else None
        if structured is not None and structured.ids is not None:  # tools in the prompt (text only)
            ids, embeds = torch.tensor([structured.ids]), None
        elif inputs is None:
            from .chat import chat_prompt_ids
            from .multimodal.processor import text_only

            ids = torch.tensor([chat_prompt_ids(tok, text_only(messages))])
            embeds = None
        else:
            ids = inputs["input_ids"]
            embeds = self.media_embeds(ids, inputs["media"]) if any(inputs["media"].values()) else None
        t0 = time.perf_counter()
        out_len = d.max_new_tokens if max_new_tokens is None else max_new_tokens
        out = generate(self, ids, max_new_tokens=out_len,
                       temperature=d.temperature if temperature is None else temperature,
                       top_p=d.top_p if top_p is None else top_p, eos_token_id=tok.eos_token_id, seed=seed,
                       inputs_embeds=embeds,
                       grammars=None if structured is None else [structured.start(ids[0].tolist(), out_len)],
                       use_mtp=use_mtp)  # fmt: skip
        tokens = [t for t in out.new_tokens[0] if t != tok.eos_token_id]
        reasoning, answer = split_reasoning(tok.decode(tokens, skip_special_tokens=True))
        seconds = time.perf_counter() - t0
        reply = Reply(reasoning, (answer or "").strip(), len(tokens), False, len(tokens) / max(seconds, 1e-9),
                      out.finish_reasons[0])  # fmt: skip
        return structured.result(out.new_tokens[0], reply) if structured is not None else reply

    def finetune(self, dataset, epochs: int = 1, **kwargs) -> dict:
        """LoRA (default) or full fine-tuning on a path / dataset name / datasets.Dataset; see deepseek.train.finetune."""
        from .train.finetune import finetune

        return finetune(self, dataset, epochs=epochs, **kwargs)

    def generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
        """transformers' `generate` signature; returns the (B, T + n) sequences (finished rows padded)."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        compile_step = bool(kwargs.pop("compile", False))  # the compiled decode step (generation/compiled.py)
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

        media = model_kwargs.get("media") or kwargs.get("media")
        embeds = self.media_embeds(input_ids, media) if media else None
        out = generate(self, input_ids, model_kwargs.get("attention_mask"), max_new_tokens=max_new,
                       temperature=config.temperature if config.do_sample else 0.0, top_p=config.top_p,
                       top_k=config.top_k or 0, eos_token_id=eos_list, pad_token_id=pad, on_token=on_token,
                       inputs_embeds=embeds, use_mtp=bool(config.use_mtp), compile=compile_step)  # fmt: skip
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
