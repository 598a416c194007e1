"""Two processes under torchrun on CPU (gloo), DDP and FSDP2: the losses match one process, and the
checkpoint written by 2 ranks loads (model and optimizer) in 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deepseek import R1Model
from deepseek.train.config import preset
from deepseek.train.trainer import TokenBatches, train

STREAM = (torch.arange(4000) * 7 % 53 + 3).long()
STEPS = 3
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from deepseek.train.config import preset
    from deepseek.train.trainer import TokenBatches, train

    out = sys.argv[1]
    dist.init_process_group("gloo")  # owned here, so both runs share one group
    stream = (torch.arange(4000) * 7 % 53 + 3).long()
    results = {}
    for mode in ("ddp", "fsdp"):
        cfg = preset("debug", out_dir=f"{out}/{mode}", max_steps=__STEPS__, seq_len=32, batch_size=4,
                     micro_batch_size=2, warmup_steps=1, lr=3e-3, progress=False, parallel=mode,
                     bias_update_speed=0.01, mtp_loss_weight=0.3)
        results[mode] = train(cfg, train_batches=TokenBatches(stream, 32, 4, seed=0))
    if dist.get_rank() == 0:
        json.dump(results, open(f"{out}/results.json", "w"))
    dist.destroy_process_group()
    """
).replace("__STEPS__", str(STEPS))


def config(out_dir, steps=STEPS, **kw):
    return preset("debug", out_dir=str(out_dir), max_steps=steps, seq_len=32, batch_size=4, micro_batch_size=4,
                  warmup_steps=1, lr=3e-3, progress=False, bias_update_speed=0.01, mtp_loss_weight=0.3, **kw)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    script = out / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(two_rank_runs, tmp_path, mode):
    out, results = two_rank_runs
    single = train(config(tmp_path / "single"), train_batches=TokenBatches(STREAM, 32, 4, seed=0))
    got = results[mode]
    assert got["world_size"] == 2 and got["parallel"] == mode
    for step, loss in single["losses"].items():
        assert abs(got["losses"][str(step)] - loss) < 1e-4, (mode, step, got["losses"][str(step)], loss)
    # the checkpoint written by 2 ranks is a plain model folder: same outputs as the 1-process model
    two = R1Model.from_pretrained(got["checkpoint"]).eval()
    one = R1Model.from_pretrained(single["checkpoint"]).eval()
    ids = STREAM[:32][None]
    with torch.no_grad():
        torch.testing.assert_close(two(input_ids=ids).logits, one(input_ids=ids).logits, atol=2e-4, rtol=1e-3)
    for (name, a), (_, b) in zip(two.named_buffers(), one.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            torch.testing.assert_close(a, b)  # identical bias updates from the all-reduced loads


def test_two_rank_checkpoint_resumes_in_one_process(two_rank_runs, tmp_path):
    """Optimizer, scheduler and data position saved by 2 FSDP ranks continue in 1 process exactly as the
    1-process checkpoint of the same run continues (to float tolerance)."""
    out, results = two_rank_runs
    train(config(tmp_path / "single"), train_batches=TokenBatches(STREAM, 32, 4, seed=0))
    after_one = train(config(tmp_path / "single", steps=STEPS + 1), train_batches=TokenBatches(STREAM, 32, 4, seed=0))
    after_two = train(config(out / "fsdp", steps=STEPS + 1), train_batches=TokenBatches(STREAM, 32, 4, seed=0))
    assert list(after_two["losses"]) == list(after_one["losses"]) == [STEPS + 1]
    assert abs(after_two["losses"][STEPS + 1] - after_one["losses"][STEPS + 1]) < 1e-4
