"""Structured pruning and intermediate-state distillation of BERT-family classifiers (issue 29, deliverable 3), on the
embedded tiny BERT (2 layers, hidden 64, 4 heads): each structure is removed whole and the model stays exact where
nothing it used was removed, and survives a save/load round trip."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

pytest.importorskip("transformers", reason="the text task needs transformers (pip install -e '.[text]')")

from edgepipe.errors import EdgepipeError  # noqa: E402
from edgepipe.models.hf import EMBEDDED, load_classifier, trim_vocabulary  # noqa: E402
from edgepipe.models.hf_pruning import prune_heads  # noqa: E402
from edgepipe.models.loading import load_torch_artifact, save_torch_artifact  # noqa: E402


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return load_classifier(EMBEDDED, 2, overrides or None).eval()


def _batch(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


def test_trimmed_vocabulary_keeps_the_outputs_of_kept_ids_and_reads_unk_for_the_rest():
    model = _model()
    reference = copy.deepcopy(model)
    kept = [7, 8, 9, 10, 11, 12]
    record = trim_vocabulary(model, kept, specials=[0, 1, 2, 3, 4], unk_id=1)
    assert record["vocabulary_after"] == 11 and model.model.get_input_embeddings().num_embeddings == 11
    assert record["embedding_params_removed"] == (record["vocabulary_before"] - 11) * 64
    ids = torch.tensor([[2, 7, 9, 12, 3], [2, 8, 10, 11, 3]])
    with torch.no_grad():
        assert torch.allclose(model(*_batch(ids)), reference(*_batch(ids)), atol=1e-6)
        # an id outside the kept set reads [UNK]'s row: the same logits as the sentence written with [UNK]
        assert torch.allclose(model(*_batch(torch.tensor([[2, 40, 9, 3]]))),
                              reference(*_batch(torch.tensor([[2, 1, 9, 3]]))), atol=1e-6)


def test_trimming_refuses_ids_past_the_embeddings():
    with pytest.raises(EdgepipeError, match="prune.vocabulary: token id 999 is past"):
        trim_vocabulary(_model(), [5, 999], specials=[0], unk_id=1)


def test_head_pruning_removes_the_least_important_heads_whole():
    model = _model()
    size = model.attention_modules()[0].attention_head_size
    with torch.no_grad():  # head 2 of layer 0 and head 1 of layer 1 add nothing: their weights and output columns are 0
        for i, head in ((0, 2), (1, 1)):
            attention, rows = model.attention_modules()[i], slice(head * size, (head + 1) * size)
            for layer in (attention.query, attention.key, attention.value):
                layer.weight[rows] = 0
                layer.bias[rows] = 0
            model.encoder_layers()[i].attention.output.dense.weight[:, rows] = 0
    ids = torch.randint(5, 40, (3, 9))
    with torch.no_grad():
        before = model(*_batch(ids))
    removed = prune_heads(model, _batch(ids), tp.importance.MagnitudeImportance(p=2), 0.25)
    assert [r["removed"] for r in removed] == [[2], [1]]
    assert [a.num_attention_heads for a in model.attention_modules()] == [3, 3]
    attention = model.attention_modules()[0]
    assert attention.query.out_features == 3 * size and attention.all_head_size == 3 * size
    assert model.encoder_layers()[0].attention.output.dense.in_features == 3 * size
    with torch.no_grad():  # the heads removed added nothing, and the heads kept are the same heads
        assert torch.allclose(model(*_batch(ids)), before, atol=1e-5)


def test_pruned_transformer_saves_and_loads_back_with_its_heads_widths_and_vocabulary(tmp_path):
    model = _model()
    trim_vocabulary(model, range(5, 30), specials=[0, 1, 2, 3, 4], unk_id=1)
    ids = torch.randint(5, 30, (2, 7))
    prune_heads(model, _batch(ids), tp.importance.MagnitudeImportance(p=2), 0.5)
    pruner = tp.pruner.MetaPruner(model, _batch(ids), importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.25, ignored_layers=[model.model.classifier] + [
                                      m for a in model.attention_modules() for m in (a.query, a.key, a.value)])
    pruner.step()
    model.sync_shapes()
    with torch.no_grad():
        expected = model(*_batch(ids))
    art = save_torch_artifact(model, {"hf": EMBEDDED}, tmp_path, (32,), 2, meta={"task": "text"})
    loaded = load_torch_artifact(art)
    assert loaded.shape_record() == model.shape_record()
    assert loaded.shape_record()["heads"] == [2, 2] and loaded.config.hidden_size < 64
    with torch.no_grad():
        assert torch.allclose(loaded(*_batch(ids)), expected, atol=1e-5)


def test_image_tasks_refuse_the_text_pruning_fields():
    from edgepipe.config import PruneConfig
    from edgepipe.tasks import get_task

    with pytest.raises(EdgepipeError, match="prune.heads: attention heads and a vocabulary are pruned for task "
                                            "text, not classification"):
        get_task("classification").prune_structure(None, None, PruneConfig(heads=0.5), None, None)


def test_intermediate_distillation_is_zero_against_itself_and_logs_each_component():
    from edgepipe.tasks import get_task
    from edgepipe.training.text_kd import TextDistiller, layer_map

    assert layer_map(6, 3) == [0, 2, 5] and layer_map(2, 1) == [1]
    task = get_task("text")
    teacher = _model(seed=1)
    twin = copy.deepcopy(teacher)
    x = {"input_ids": torch.randint(5, 40, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
         "token_type_ids": torch.zeros(4, 10, dtype=torch.long)}
    x["attention_mask"][1, -3:] = 0
    y = torch.tensor([0, 1, 1, 0])
    same = TextDistiller(teacher, twin, task, temperature=2.0, alpha=0.5, beta=1.0)
    terms = same.step(twin.eval(), x, y)
    assert float(terms["hidden"]) < 1e-10 and float(terms["attention"]) < 1e-6 and float(terms["soft"]) < 1e-6
    same.remove()
    student = _model(seed=2, num_hidden_layers=1)
    distiller = TextDistiller(teacher, student, task, temperature=2.0, alpha=0.5, beta=1.0)
    terms = distiller.step(student.train(), x, y)
    assert {"loss", "soft", "hard", "hidden", "attention"} <= set(terms) and float(terms["hidden"]) > 0
    terms["loss"].backward()
    assert student.model.bert.embeddings.word_embeddings.weight.grad is not None
    assert distiller.record()["layer_map"] == {"embeddings": "embeddings", "student layer 0": "teacher layer 1"}
    distiller.remove()


def test_a_narrower_student_learns_through_projections_and_skips_attention_with_other_head_counts():
    from edgepipe.tasks import get_task
    from edgepipe.training.text_kd import TextDistiller

    teacher = _model(seed=1)
    student = _model(seed=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    distiller = TextDistiller(teacher, student, get_task("text"), temperature=2.0, alpha=0.5, beta=1.0)
    assert distiller.projections is not None and len(distiller.projections) == 3  # embeddings + 2 layers
    x = {"input_ids": torch.randint(5, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
         "token_type_ids": torch.zeros(2, 6, dtype=torch.long)}
    terms = distiller.step(student.train(), x, torch.tensor([0, 1]))
    assert "attention" not in terms and "left out" in distiller.record()["attention"]
    distiller.remove()
