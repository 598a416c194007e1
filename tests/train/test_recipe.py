import json

import torch

from deepseek import R1Model
from deepseek.train.recipe import STAGES, recipe, run_recipe


def test_debug_recipe_runs_every_stage_and_reruns_skip_finished_ones(tmp_path):
    torch.set_num_threads(2)
    cfg = recipe("debug", out_dir=str(tmp_path / "r"))
    record = run_recipe(cfg)
    assert set(record["outputs"]) == set(STAGES)
    model = R1Model.from_pretrained(record["outputs"]["grpo"])
    assert model.config.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    saved = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert saved["outputs"] == record["outputs"] and saved["total_seconds"] > 0
    again = run_recipe(recipe("debug", out_dir=str(tmp_path / "r")))  # everything finished: nothing retrains
    assert again["outputs"] == record["outputs"]
    assert again["seconds"] == record["seconds"]
