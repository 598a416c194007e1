"""Evaluation: perplexity on text, task accuracy with the exact graders (greedy and pass@k), shared by
`deepseek eval` and the training recipes.

    from deepseek.eval import perplexity, task_accuracy, load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("deepseek/r1-tiny")
    perplexity(model, tok, "held_out.txt")                       # {"perplexity": ..., "tokens": ...}
    task_accuracy(model, tok, "addition", n=100, k=1)            # greedy accuracy
    task_accuracy(model, tok, "addition", n=100, k=8, temperature=0.8)   # pass@8
"""

from .perplexity import perplexity
from .tasks import generate_completions, load_model_and_tokenizer, pass_at_k, task_accuracy

__all__ = ["generate_completions", "load_model_and_tokenizer", "pass_at_k", "perplexity", "task_accuracy"]
