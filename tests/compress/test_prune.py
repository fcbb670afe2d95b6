"""Structured pruning shrinks exactly what it says and keeps the kept units' function; unstructured
pruning zeroes the smallest weights; records replay on load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tansuo.compress import StructuredPruneConfig, UnstructuredPruneConfig, prune_, taylor_scores
from tansuo.compress.prune import keep_zeros, magnitude_scores, restore_pruned, sparsity
from tansuo.errors import CompressionError
from tansuo.models import create_model


def _bert(**kw):
    torch.manual_seed(0)
    return create_model("bert_test", num_heads=4, num_classes=3, dropout=0.0, **kw).eval()


def _masked_forward(model, ids, head_keep: dict, ffn_keep: dict):
    """The unpruned model with pruned heads' and neurons' outputs gated to zero."""
    handles = []
    for name, keep in head_keep.items():
        attn = model.get_submodule(name)
        gate = torch.zeros(attn.num_heads)
        gate[keep] = 1
        g = gate.repeat_interleave(attn.head_dim)
        handles.append(attn.out_proj.register_forward_pre_hook(lambda m, a, g=g: (a[0] * g,)))
    for name, keep in ffn_keep.items():
        mlp = model.get_submodule(name)
        g = torch.zeros(mlp.out_proj.in_features)
        g[keep] = 1
        handles.append(mlp.out_proj.register_forward_pre_hook(lambda m, a, g=g: (a[0] * g,)))
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        for h in handles:
            h.remove()


def test_shrunk_model_equals_masked_original_and_has_the_predicted_shapes() -> None:
    model = _bert()
    ids = model.example_input(3, seq_len=10)
    scores = magnitude_scores(model)
    # what prune_ will keep: recompute the same global choice through the public record afterwards
    before = {n: s.clone() for n, s in scores.items()}
    reference = _bert()  # identical weights (same seed)
    record = prune_(model, StructuredPruneConfig(heads=0.25, ffn=0.5), scores=scores)

    # 8 heads in all, 2 removed; 2 x 128 neurons in all, 128 removed
    assert sum(record["attention"].values()) == 6
    assert sum(record["feed_forward"].values()) == 128
    for name, n in record["attention"].items():
        attn = model.get_submodule(name)
        assert attn.num_heads == n and attn.q_proj.weight.shape == (n * 8, 32)
        assert attn.kv_proj.weight.shape == (2 * n * 8, 32) and attn.out_proj.weight.shape == (32, n * 8)
    for name, n in record["feed_forward"].items():
        mlp = model.get_submodule(name)
        assert mlp.in_proj.weight.shape == (n, 32) and mlp.out_proj.weight.shape == (32, n)
    removed = 2 * (3 * 32 * 8 + 3 * 8 + 32 * 8) + 128 * (32 + 1 + 32)  # q,k,v rows + biases, out cols
    assert reference.num_params() - model.num_params() == removed

    # the kept units are the highest-scoring ones (normalised within each layer)
    head_keep = {n: _top(before[n], record["attention"][n]) for n in record["attention"]}
    ffn_keep = {n: _top(before[n], record["feed_forward"][n]) for n in record["feed_forward"]}
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out, _masked_forward(reference, ids, head_keep, ffn_keep), atol=1e-5, rtol=0)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values


def test_every_layer_keeps_at_least_one_unit() -> None:
    model = _bert()
    scores = magnitude_scores(model)
    scores["stack.layers.0.attn"] = torch.full((4,), 1e-9)  # layer 0's heads look useless
    scores["stack.layers.0.attn"][0] = 1e-8
    record = prune_(model, StructuredPruneConfig(heads=0.75), scores=scores)
    assert min(record["attention"].values()) >= 1 and sum(record["attention"].values()) == 2


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_ratios_that_remove_everything_are_refused(ratio: float) -> None:
    with pytest.raises(CompressionError, match="heads"):
        StructuredPruneConfig(heads=ratio)
    with pytest.raises(CompressionError, match="unstructured"):
        UnstructuredPruneConfig(sparsity=max(ratio, 1.0))


def test_unsupported_family_names_what_is_supported() -> None:
    with pytest.raises(CompressionError, match=r"\(bert, .*vit.*: attention heads.*this model is 'gpt'"):
        prune_(create_model("gpt_test"), StructuredPruneConfig(heads=0.5))


def test_taylor_scores_leave_weights_alone_and_rank_a_dead_head_last() -> None:
    model = _bert()
    with torch.no_grad():  # head 1 of layer 1 writes nothing: its output cannot matter
        model.stack.layers[1].attn.out_proj.weight[:, 8:16] = 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [
        {"ids": torch.randint(0, 128, (4, 10), generator=g), "y": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(3)
    ]
    scores = taylor_scores(model, batches, lambda m, b: F.cross_entropy(m(b["ids"]), b["y"]))
    assert scores["stack.layers.1.attn"][1] == 0 and scores["stack.layers.1.attn"].sum() > 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and all(
        p.requires_grad for p in model.parameters()
    )


def test_vit_prunes_too() -> None:
    torch.manual_seed(0)
    model = create_model("vit_test", num_classes=4).eval()
    x = model.example_input(2)
    prune_(model, StructuredPruneConfig(heads=0.5, ffn=0.25))
    assert model(x).shape == (2, 4)


def test_restore_replays_the_shapes_so_the_state_dict_loads() -> None:
    model = _bert()
    record = prune_(model, StructuredPruneConfig(heads=0.5, ffn=0.5))
    fresh = _bert()
    restore_pruned(fresh, record)
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = model.example_input(2, seq_len=7)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_unstructured_zeroes_the_smallest_weights_and_keep_zeros_holds_them() -> None:
    model = _bert().train()
    prune_(model, UnstructuredPruneConfig(sparsity=0.8))
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)
    assert model.tok_emb.weight.ne(0).all()  # embeddings (and the tied decoder) are not pruned
    handles = keep_zeros(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(model.example_input(4, seq_len=8)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for h in handles:
        h.remove()
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)
