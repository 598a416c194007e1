"""Weight layout for fast one-token decode (same values, transposed strides)."""

from __future__ import annotations

import torch


def prepare_for_decode(model) -> None:
    """Store every Linear weight (and each routed expert's matrices) column-major: same values and shapes,
    transposed strides.

    One-token decode is a matrix-vector product; on CPU BLAS it runs ~1.5-3x faster reading W^T row by row
    than W. The parameters stay ordinary nn.Linear weights (training, saving and LoRA are unaffected; saving
    writes them contiguous). Idempotent; costs one copy of each weight, once."""
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("kv_b_proj") or (tied and name == "lm_head"):
                continue  # kv_b_proj is read by the absorbed einsums; a tied head shares the embedding
            w = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) and w is not None and w.dim() == 2 and w.is_contiguous():
                module.weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
            for stack in ("gate_up_proj", "down_proj"):  # routed experts: grouped matmul reads (E, D, F) rows
                p = getattr(module, stack, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3 and p.is_contiguous():
                    setattr(module, stack, torch.nn.Parameter(p.transpose(1, 2).contiguous().transpose(1, 2),
                                                              requires_grad=p.requires_grad))  # fmt: skip
