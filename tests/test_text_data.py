"""Text data (edgepipe.data.text, edgepipe.data.text_loading) and Hugging Face models (edgepipe.models.hf): files read
and checked row by row, the model folder's tokenizer, dynamic padding, offline loading; every bad input is one line
naming the file and line, exit 2, the run folder untouched."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepipe.config import validate_config
from edgepipe.data import text as td
from edgepipe.errors import EdgepipeError
from edgepipe.models import hf

pytest.importorskip("transformers", reason="the text task needs transformers (pip install -e '.[text]')")
SHARED = Path(__file__).resolve().parents[2] / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "datasets" / "sst2"


def _write(folder: Path, name: str, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _config(data_path: Path, **data) -> object:
    return validate_config({
        "name": "text-test", "task": "text",
        "data": {"kind": "text", "path": str(data_path), "train_split": "train", "val_split": "test",
                 "batch_size": 4, "eval_batch_size": 8, "max_length": 16, **data},
        "teacher": {"model": {"hf": hf.EMBEDDED}, "train": {"epochs": 0}},
        "distill": {"student": {"hf": hf.EMBEDDED}, "init": "random"}}, "test")


GOOD = "sentence\tlabel\nthe film was good\t1\nthe plot is dull\t0\na superb cast\t1\nboring and stale\t0\n"


@pytest.fixture
def folder(tmp_path):
    _write(tmp_path / "d", "train.tsv", GOOD)
    _write(tmp_path / "d", "test.tsv", GOOD)
    return tmp_path / "d"


def test_reads_tokenises_and_pads_each_batch_to_its_longest(folder):
    from edgepipe.data.text_loading import load_text_data

    data = load_text_data(_config(folder))
    assert data.class_names == ["0", "1"] and data.train_size == 4 and data.val_size == 4
    assert data.input_names == ("input_ids", "attention_mask", "token_type_ids")
    (x, y), = list(data.val_batches(8))
    lengths = x["attention_mask"].sum(1)
    assert x["input_ids"].dtype == torch.int64 and x["input_ids"].shape[1] == int(lengths.max())  # dynamic padding
    assert (x["input_ids"][x["attention_mask"] == 0] == data.pad_id).all()
    assert y.tolist() == [1, 0, 1, 0]
    notes = data.notes["text"]
    assert notes["splits"]["train"]["sentences"] == 4 and notes["splits"]["train"]["per_class"] == {"0": 2, "1": 2}
    # the same seed and epoch give the same batches; another epoch another order
    a = [b[1].tolist() for b in data.train_batches(2, 0)]
    assert a == [b[1].tolist() for b in data.train_batches(2, 0)]
    head, labels = data.val_head(3)
    assert head["input_ids"].shape == (3, 16) and labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_json_lines(tmp_path, fmt):
    rows = [("good, very good", "pos"), ('a "dull" plot', "neg")]
    if fmt == "csv":
        body = "text,label\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",{lab}\n' for t, lab in rows)
    else:
        body = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
    p = _write(tmp_path, f"train.{fmt}", body)
    split = td.read_split(p, "text", "label")
    assert split.texts == [t for t, _ in rows] and split.labels == ["pos", "neg"]
    assert td.class_names_of(split, None) == ["neg", "pos"]


@pytest.mark.parametrize("body,needle", [
    ("text\tlabel\nfine\t1\n", "line 2 has no field 'sentence'"),
    ("sentence\tlabel\nfine\t1\n \t0\n", "line 3: empty text in 'sentence'"),
    ("sentence\tlabel\nfine\t1\ndull\t\n", "line 3: no label in 'label'"),
    ("sentence\tlabel\nfine\t1\ndull\t0\textra\n", "line 3 has 3 fields, the header 2"),
    ("", "the file is empty"),
    ("sentence\tlabel\n", "a header but no rows"),
])
def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, body, needle):
    p = _write(tmp_path, "train.tsv", body)
    with pytest.raises(EdgepipeError) as e:
        td.read_split(p, "sentence", "label")
    assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_not_utf8_names_the_line(tmp_path):
    p = _write(tmp_path, "train.tsv", b"sentence\tlabel\nfine\t1\ncaf\xe9 au lait\t0\n")
    with pytest.raises(EdgepipeError, match=r"train.tsv: line 3 is not UTF-8 \(byte 0xe9\)"):
        td.read_split(p, "sentence", "label")


def test_a_label_outside_the_classes(tmp_path):
    p = _write(tmp_path, "test.tsv", "sentence\tlabel\nfine\t1\nodd\t2\n")
    split = td.read_split(p, "sentence", "label")
    with pytest.raises(EdgepipeError, match=r"test.tsv: line 3: label '2' is not one of the 2 classes \(0, 1\)"):
        td.label_indices(split, ["0", "1"])
    named = td.read_split(_write(tmp_path, "n.tsv", "sentence\tlabel\nfine\tpositive\nodd\tneutral\n"),
                          "sentence", "label")
    with pytest.raises(EdgepipeError, match="line 3: label 'neutral'"):
        td.label_indices(named, ["negative", "positive"])


def test_a_tokenizer_that_is_not_the_models(folder, tmp_path):
    """A tokenizer whose ids reach past the teacher's embeddings is refused, naming both folders."""
    from edgepipe.data.text_loading import load_text_data

    small = tmp_path / "small-model"
    small.mkdir()
    config = json.loads((hf.embedded_folder() / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))
    cfg = _config(folder, tokenizer=str(hf.embedded_folder()))
    cfg.teacher.model.hf = str(small)
    with pytest.raises(EdgepipeError, match=r"the tokenizer has \d+ tokens but the model at .*small-model embeds 20"):
        load_text_data(cfg)


def test_missing_split_file_and_path(tmp_path):
    with pytest.raises(EdgepipeError, match="no dev.tsv, dev.csv or dev.jsonl"):
        td.split_file(tmp_path, "dev")


def test_bad_file_exits_2_and_leaves_the_run_untouched(folder, tmp_path, capsys):
    """Through the CLI: a run made with good data, then a command on the same run folder with a bad file."""
    import yaml

    from edgepipe.cli import main

    cfg_path = tmp_path / "c.yaml"
    raw = {"name": "t", "task": "text",
           "data": {"kind": "text", "path": str(folder), "val_split": "test", "max_length": 16},
           "teacher": {"model": {"hf": hf.EMBEDDED}, "train": {"epochs": 0}},
           "distill": {"student": {"hf": hf.EMBEDDED}, "init": "random"}}
    cfg_path.write_text(yaml.safe_dump(raw))
    _write(folder, "test.tsv", "sentence\tlabel\nfine\t1\nodd\t7\n")
    run = tmp_path / "run"
    assert main(["teacher", "--config", str(cfg_path), "--target", "intel-xeon-amx", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test.tsv: line 3: label '7'" in err[0]
    assert not run.exists() or not any((run / "teacher").glob("*"))


def test_synthetic_task_is_deterministic_and_balanced():
    a, b = td.synthetic_split(200, 0, "train"), td.synthetic_split(200, 0, "train")
    assert a.texts == b.texts and a.labels == b.labels
    assert td.synthetic_split(200, 0, "val").texts != a.texts
    assert 0.3 < np.mean([lab == "positive" for lab in a.labels]) < 0.7
    assert set(" ".join(a.texts).split()) <= set(td.SYNTHETIC_VOCAB)


def test_embedded_model_folder_loads_offline_with_a_head_for_the_classes():
    model = hf.load_classifier(hf.EMBEDDED, 3)
    tok = hf.load_tokenizer(hf.EMBEDDED)
    enc = tok(["the film was not good", "a superb cast"], padding=True, return_tensors="pt")
    out = model.eval()(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert out.shape == (2, 3)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    with pytest.raises(EdgepipeError, match="not a folder"):
        hf.load_classifier(str(Path("/nonexistent/model")), 2)


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((hf.embedded_folder() / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(EdgepipeError, match="pickled weights"):
        hf.load_classifier(str(folder), 2)


@pytest.mark.skipif(not MINILM.is_dir(), reason="needs ../shared/models/all-MiniLM-L6-v2 (not in a user's clone)")
def test_minilm_loads_offline_with_its_pretrained_encoder():
    model = hf.load_classifier(str(MINILM), 2)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    n = sum(p.numel() for p in model.parameters())
    assert 22_000_000 < n < 23_500_000
    tok = hf.load_tokenizer(str(MINILM))
    hf.check_tokenizer(tok, model.config, str(MINILM), str(MINILM))


@pytest.mark.skipif(not SST2.is_dir() or not MINILM.is_dir(), reason="needs ../shared (sst2, MiniLM)")
def test_sst2_reads_with_minilms_tokenizer():
    from edgepipe.data.text_loading import load_text_data

    cfg = _config(SST2, choice_split="dev", limit_train=200, limit_val=100, max_length=64)
    cfg.teacher.model.hf = str(MINILM)
    data = load_text_data(cfg)
    assert data.class_names == ["0", "1"] and data.val_size == 100 and data.choice_split().val_size == 6735
    assert data.notes["text"]["splits"]["val"]["sentences"] == 872


def test_what_text_does_not_take_is_refused_with_one_line(folder):
    """Latency-targeted pruning (it times image candidates), image feature hints and the soft-target runtimes that
    take image batches are refused by name; pruning to a params target and QAT are built."""
    from edgepipe.tasks import get_task

    task = get_task("text")
    cfg = _config(folder)
    cfg.prune.enabled, cfg.qat.enabled = True, True
    task.check_stage(cfg, "prune")  # params/MACs targets: built (edgepipe.models.hf_pruning)
    cfg.prune.target = "latency"
    with pytest.raises(EdgepipeError, match="prune.target: latency-targeted pruning times image candidates"):
        task.check_stage(cfg, "prune")
    task.check_stage(cfg, "qat")  # INT8 QAT of the Linear layers is built
    cfg.distill.feature_pairs = [{"teacher": "a", "student": "b"}]
    with pytest.raises(EdgepipeError, match="distill.feature_pairs: feature hints .* with distill.beta alone"):
        task.check_stage(cfg, "distill")
    cfg.distill.feature_pairs = []
    cfg.prune.enabled = cfg.qat.enabled = False
    cfg.soft_targets.cache = True
    with pytest.raises(EdgepipeError, match="soft_targets: task text computes the teacher's logits in PyTorch"):
        task.check_stage(cfg, "distill")


def test_a_shallower_student_starts_from_evenly_spaced_teacher_layers():
    from edgepipe.training.distillation import init_from_teacher

    torch.manual_seed(0)
    teacher = hf.load_classifier(hf.EMBEDDED, 2, {"num_hidden_layers": 3})
    student = hf.load_classifier(hf.EMBEDDED, 2, {"num_hidden_layers": 2})
    record = init_from_teacher(student, teacher)
    assert record["layers"] == [0, 2]  # the first and the last
    t, s = teacher.state_dict(), student.state_dict()
    key = "model.bert.encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(s[key.format(1)], t[key.format(2)]) and torch.equal(s[key.format(0)], t[key.format(0)])
    assert torch.equal(s["model.classifier.weight"], t["model.classifier.weight"])
    narrow = hf.load_classifier(hf.EMBEDDED, 2, {"num_hidden_layers": 1, "intermediate_size": 32})
    with pytest.raises(EdgepipeError, match="student's intermediate_size is 32, the teacher's 128"):
        init_from_teacher(narrow, teacher)
