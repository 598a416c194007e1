"""OpenAI response bodies: chat completions (whole and chunked), text completions with echo and logprobs."""

from __future__ import annotations

import json

from .sequence import Output


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_body(t: dict) -> dict:
    return {"prompt_tokens": t["prompt_tokens"], "completion_tokens": t["completion_tokens"],
            "total_tokens": t["total_tokens"],
            "completion_tokens_details": {"reasoning_tokens": t["reasoning_tokens"]},
            "cost_usd": round(t["cost_usd"], 10)}  # fmt: skip


def openai_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason: stop | length (our cancelled / timeout / error end a choice as "stop")."""
    return reason if reason in (None, "stop", "length") else "stop"


def chat_chunk(rid, created, model, index, delta, finish_reason=None, usage=None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": []}
    if index is not None:
        body["choices"] = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if usage is not None:
        body["usage"] = usage_body(usage)
    return body


def chat_response(rid, created, model, outs: list[Output], totals: dict) -> dict:
    choices = []
    for i, o in enumerate(outs):
        msg = {"role": "assistant", "content": o.text}
        if o.reasoning:
            msg["reasoning_content"] = msg["reasoning"] = o.reasoning
        choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": openai_reason(o.finish_reason)})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_body(totals)}  # fmt: skip


def completion_response(tokenizer, rid, created, model, outs: list[Output], prompts: list[list[int]], echo: bool,
                        logprobs: int | None, totals: dict) -> dict:  # fmt: skip
    choices = []
    for i, (o, ids) in enumerate(zip(outs, prompts)):
        prompt_text = tokenizer.decode(ids, skip_special_tokens=False) if echo else ""
        text = prompt_text + o.reasoning + o.text
        lp = None
        if logprobs is not None:
            lp = _logprobs(tokenizer, ids if echo else [], o.prompt_logprobs if echo else None, o.token_ids,
                           o.logprobs)  # fmt: skip
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": openai_reason(o.finish_reason)})
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage_body(totals)}  # fmt: skip


def _logprobs(tokenizer, prompt_ids, prompt_lps, gen_ids, gen_lps) -> dict:
    """OpenAI legacy logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    ids = list(prompt_ids) + list(gen_ids)
    lps = list(prompt_lps or [None] * len(prompt_ids)) + list(gen_lps)
    for tid, lp in zip(ids, lps):
        piece = tokenizer.decode([tid], skip_special_tokens=False)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(lp[0])
            tops.append({tokenizer.decode([k], skip_special_tokens=False): v for k, v in lp[1].items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
