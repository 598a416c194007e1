"""Selection training (deepseek/train/selection.py): its keys are the cache's, and its loss moves the choice."""

import random

import pytest
import torch

from deepseek import R1ForCausalLM
from deepseek.eval.passkey import BYTES, passkey_sample, small_config
from deepseek.model.longctx.learned import block_summary
from deepseek.model.longctx.prefill import chunked_prefill, make_cache
from deepseek.train.passkey import VIEW_SETTINGS, train, training_batch
from deepseek.train.selection import LeadQueries, lead_keys, selection_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def view_model(seed: int = 0) -> R1ForCausalLM:
    torch.manual_seed(seed)
    model = R1ForCausalLM(small_config(num_hidden_layers=3, first_k_dense_replace=3))
    model.config.set_components(**{**VIEW_SETTINGS, "kv_topk_blocks": 4, "kv_lead_layer": 1})
    return model


def test_lead_keys_are_what_the_cache_summarises():
    model = view_model().eval()
    prompt, _ = passkey_sample(random.Random(2), 1500, 2, BYTES, "licenses")
    cache = make_cache(model.config, 1, prompt.numel(), compressed=True)
    with torch.no_grad():
        chunked_prefill(model, prompt[None], cache, refresh=False)
        st, b, sink = cache.store[1], cache.block, cache.sink_len
        n = st.n_blocks
        mean, radius = block_summary(lead_keys(model, prompt)[sink : sink + n * b].view(1, n, b, -1))
    assert n > 10
    assert (mean - st.kmean[:, :n]).abs().max() < 1e-5
    assert (radius - st.kradius[:, :n]).abs().max() < 1e-5


def test_selection_loss_training_raises_the_needles_share():
    model = view_model(1).train()
    hook = LeadQueries(model)
    sources: list = []
    ids, labels, pos, answer = training_batch(random.Random(4), 4, 544, 131072, keys=4, pose=0, view=model.config,
                                              view_source=(1024, 2048), filler="train", sources=sources)  # fmt: skip
    assert sum(s is not None for s in sources) >= 2
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        model(ids, position_ids=pos)
        loss = selection_loss(model, hook, sources)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    row = next(s for s in sources if s is not None)
    assert row["decode"] and all(len(t) in (1, 2) for t in row["targets"])
    hook.remove()


def test_selection_training_needs_views_and_a_lead_layer(tmp_path):
    with pytest.raises(ValueError, match="needs --view"):  # before the model is built
        train(str(tmp_path / "a"), steps=1, select_weight=1.0)
    model = R1ForCausalLM(small_config())
    with pytest.raises(ValueError, match="kv_lead_layer"):
        LeadQueries(model)
    assert not (tmp_path / "a").exists()
