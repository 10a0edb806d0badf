"""The text task's splits, as a config names them (``Task.load_data`` of ``edgepipe.tasks.text``).

``data.kind: text`` reads ``data.train_split`` and ``data.val_split`` (and ``data.choice_split`` when given) as files
under ``data.path`` (``edgepipe.data.text``: every row checked before anything is tokenised); ``text-synthetic``
generates the embedded default's sentences. The tokenizer is ``data.tokenizer``'s folder, else the teacher's
``model.hf`` folder, and it must fit the teacher's embeddings (``edgepipe.models.hf.check_tokenizer``). Choices are
made on ``choice_split`` when given, else on ``data.val_from_train`` (carved as for images), else on the validation
split. What was read is recorded in the run (``notes["text"]``): files, tokenizer, sentence counts, token lengths and
how many sentences reach ``max_length`` (truncated, or exactly that long).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe.data.text import (TextBundle, TextSplit, class_names_of, label_indices, read_split, split_file,
                                synthetic_split, token_lengths, tokenize)
from edgepipe.errors import EdgepipeError

if TYPE_CHECKING:
    from edgepipe.config import PipelineConfig


def tokenizer_folder(config: PipelineConfig) -> str:
    folder = config.data.tokenizer or config.teacher.model.hf
    if not folder:
        raise EdgepipeError("data.tokenizer: task text reads its sentences with a Hugging Face tokenizer; give "
                            "data.tokenizer (a model folder) or a teacher with model.hf")
    return folder


def load_text_data(config: PipelineConfig) -> TextBundle:
    from edgepipe.data.loading import carve_held_out
    from edgepipe.models.hf import load_tokenizer, resolve_folder

    cfg = config.data
    if cfg.kind == "text":
        root = Path(cfg.path or "")
        if not root.is_dir():
            raise EdgepipeError(f"{root}: data.path is not a folder; give the folder holding the split files "
                                "(train.tsv, test.tsv, ...)")
        train = read_split(split_file(root, cfg.train_split), cfg.text_column, cfg.label_column)
        val = read_split(split_file(root, cfg.val_split), cfg.text_column, cfg.label_column)
        choice = (read_split(split_file(root, cfg.choice_split), cfg.text_column, cfg.label_column)
                  if cfg.choice_split else None)
    elif cfg.kind == "text-synthetic":
        n = cfg.synthetic_sentences
        train, val = synthetic_split(n, config.seed, "train"), synthetic_split(max(10, n // 4), config.seed, "val")
        choice = synthetic_split(max(10, n // 4), config.seed, "dev") if cfg.choice_split else None
    else:
        raise EdgepipeError(f"data.kind: task text reads text or text-synthetic data, not {cfg.kind}")
    folder = tokenizer_folder(config)
    tokenizer = load_tokenizer(folder)
    if config.teacher.model.hf:
        _check_against_teacher(tokenizer, folder, config.teacher.model.hf)
    class_names = class_names_of(train, cfg.classes)
    splits = {"train": train, "val": val, **({"choice": choice} if choice is not None else {})}
    labels = {name: label_indices(split, class_names) for name, split in splits.items()}
    tokens = {name: tokenize(tokenizer, split, cfg.max_length) for name, split in splits.items()}
    bundle = TextBundle(tokens["train"], labels["train"], tokens["val"], labels["val"], class_names,
                        pad_id=int(tokenizer.pad_token_id), max_length=cfg.max_length, seed=config.seed)
    if cfg.limit_train or cfg.limit_val:
        bundle = bundle.subset(cfg.limit_train or bundle.train_size, cfg.limit_val or bundle.val_size)
    if choice is not None:
        bundle = bundle.with_choice(tokens["choice"], labels["choice"])
    elif cfg.val_from_train is not None:
        bundle = carve_held_out(bundle, cfg.val_from_train, cfg.val_from_train_seed)
    bundle.notes = {**bundle.notes, "text": _notes(splits, tokens, labels, class_names, folder, resolve_folder(folder),
                                                   tokenizer, cfg.max_length)}
    return bundle


def _check_against_teacher(tokenizer: Any, tokenizer_folder_name: str, model_folder: str) -> None:
    """The tokenizer (the teacher's own, or data.tokenizer's) must fit the teacher's embeddings."""
    import json

    from edgepipe.models.hf import check_tokenizer, resolve_folder

    config = json.loads((resolve_folder(model_folder) / "config.json").read_text())
    check_tokenizer(tokenizer, type("Config", (), config), tokenizer_folder_name, model_folder)


def _notes(splits: dict[str, TextSplit], tokens: dict[str, Any], labels: dict[str, Any], class_names: list[str],
           folder_name: str, folder: Path, tokenizer: Any, max_length: int) -> dict[str, Any]:
    out: dict[str, Any] = {"tokenizer": folder_name, "tokenizer_folder": str(folder),
                           "tokenizer_class": type(tokenizer).__name__, "vocabulary": len(tokenizer),
                           "max_length": max_length, "classes": class_names, "splits": {},
                           "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
                           "unk_id": int(tokenizer.unk_token_id if tokenizer.unk_token_id is not None
                                         else tokenizer.pad_token_id)}
    for name, split in splits.items():
        ids = tokens[name]["input_ids"]
        counts = np.bincount(labels[name].numpy(), minlength=len(class_names))
        out["splits"][name] = {"file": split.path, "sentences": len(split.texts),
                               "per_class": {c: int(k) for c, k in zip(class_names, counts)},
                               "tokens": token_lengths(tokens[name]),
                               "at_max_length": int(sum(len(r) >= max_length for r in ids))}
    return out
