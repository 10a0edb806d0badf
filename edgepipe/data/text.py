"""Text classification data: labelled sentences from TSV, CSV or JSON Lines files, tokenised with the model folder's
own tokenizer, served as the stages read any data (``Batches``) in dynamically padded batches.

A split is a file under ``data.path`` named after it (``train.tsv``, ``dev.csv``, ``test.jsonl``); the text and label
columns are named in the config (``data.text_column``, ``data.label_column``). Every row is checked before anything
is tokenised, and a bad one is one line naming the file, the line and what to do (``EdgepipeError``, exit 2): a
missing file or column, a line that is not UTF-8, a row with the wrong number of fields, an empty text, an empty
label, a label outside the classes. Labels are class names (``data.classes``, in label order) or, without them,
the integers 0..K-1 (or, when not integers, the training split's sorted distinct values).

Tokenisation is the model folder's tokenizer (Hugging Face ``transformers.AutoTokenizer``, loaded with
``local_files_only``), truncated at ``data.max_length``. A batch is padded to its own longest sentence, not to
``max_length`` (dynamic padding: SST-2's median sentence is ~10 tokens), and its inputs are a dict of int64 tensors
named as the model takes them: ``input_ids``, ``attention_mask`` and, where the tokenizer produces them,
``token_type_ids``. Order, sharding and class-balanced subsets are the shared ones (``edgepipe.data.batches``), so
text batches depend on seed and epoch only, like every other loader's.

``synthetic_split`` generates the embedded default's task (no files, no download): short sentences whose label is
their sentiment, with negation and contrast ("... but ..."), so a tiny model has something to learn that a bag of
words alone does not solve.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepipe.data.batches import Batches, batch_starts, class_spread, epoch_order, shard_of
from edgepipe.errors import EdgepipeError

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
"""Every input a BERT-family classifier takes, in the order its forward takes them."""


@dataclass
class TextSplit:
    """One split as read from its file: the texts and their labels as written (strings), each with its file line."""

    path: str
    texts: list[str]
    labels: list[str]
    lines: list[int]


def split_file(root: Path, split: str) -> Path:
    """The file of ``split`` under ``root``: ``split`` itself when it has a known suffix, else the one
    ``split.tsv|.csv|.jsonl`` that exists."""
    direct = root / split
    if direct.suffix in FORMATS:
        if not direct.is_file():
            raise EdgepipeError(f"{direct}: no such file; check data.path and the split's name")
        return direct
    found = [root / f"{split}{suffix}" for suffix in FORMATS if (root / f"{split}{suffix}").is_file()]
    if not found:
        raise EdgepipeError(f"{root}: no {split}.tsv, {split}.csv or {split}.jsonl; check data.path and the split "
                            "names (data.train_split, data.val_split, data.choice_split)")
    if len(found) > 1:
        raise EdgepipeError(f"{root}: {', '.join(p.name for p in found)} are all split {split}; keep one, or name the "
                            "file with its suffix (e.g. data.train_split: train.tsv)")
    return found[0]


def _decoded(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise EdgepipeError(f"{path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8 "
                            "(e.g. iconv -f latin1 -t utf-8)") from None


def read_split(path: Path, text_column: str, label_column: str) -> TextSplit:
    """Every row of a TSV, CSV or JSON Lines file, checked (see the module docstring)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise EdgepipeError(f"{path}: not a .tsv, .csv or .jsonl file")
    text = _decoded(path)
    if not text.strip():
        raise EdgepipeError(f"{path}: the file is empty; give a file with a header and one row per sentence")
    rows = _jsonl_rows(path, text) if kind == "jsonl" else _table_rows(path, text, kind)
    texts, labels, lines = [], [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                raise EdgepipeError(f"{path}: line {line} has no field '{column}' (it has: "
                                    f"{', '.join(map(str, row))}); set "
                                    f"data.{'text' if column == text_column else 'label'}_column to the right name")
        value, label = row[text_column], row[label_column]
        if not isinstance(value, str) or not value.strip():
            raise EdgepipeError(f"{path}: line {line}: empty text in '{text_column}'; remove the row or give it a text")
        if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (list, dict)):
            raise EdgepipeError(f"{path}: line {line}: no label in '{label_column}'; remove the row or label it")
        texts.append(value)
        labels.append(str(label).strip())
        lines.append(line)
    if not texts:
        raise EdgepipeError(f"{path}: a header but no rows; give at least one labelled sentence")
    return TextSplit(str(path), texts, labels, lines)


def _table_rows(path: Path, text: str, kind: str) -> Iterator[tuple[int, dict[str, str]]]:
    # GLUE's TSVs are not quoted (a sentence may hold a lone '"'): TSV is read without quoting, CSV with it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL)
    try:
        header = next(reader)
        header = [h.strip() for h in header]
        for values in reader:
            line = reader.line_num
            if not values or values == [""]:
                continue
            if len(values) != len(header):
                raise EdgepipeError(f"{path}: line {line} has {len(values)} fields, the header {len(header)} "
                                    f"({', '.join(header)}); fix the row (a {'tab' if kind == 'tsv' else 'comma'} "
                                    "inside a text must be quoted in CSV; TSV texts may not hold tabs)")
            yield line, dict(zip(header, values))
    except csv.Error as e:
        raise EdgepipeError(f"{path}: line {reader.line_num}: {e}; fix the row's quoting") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EdgepipeError(f"{path}: line {line} is not JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise EdgepipeError(f"{path}: line {line} is a JSON {type(row).__name__}, not an object; one object per "
                                "line with the text and label fields")
        yield line, row


def class_names_of(train: TextSplit, classes: list[str] | None) -> list[str]:
    """The classes in label order: ``classes`` as configured, else 0..K-1 when every training label is an integer,
    else the training labels' sorted distinct values."""
    if classes:
        return [str(c) for c in classes]
    seen = sorted(set(train.labels))
    if all(_is_int(v) for v in seen):
        top = max(int(v) for v in seen)
        if min(int(v) for v in seen) < 0:
            bad = next(i for i, v in enumerate(train.labels) if int(v) < 0)
            raise EdgepipeError(f"{train.path}: line {train.lines[bad]}: label {train.labels[bad]} is negative; "
                                "integer labels are class indices 0..K-1 (or name the classes in data.classes)")
        return [str(i) for i in range(top + 1)]
    return seen


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def label_indices(split: TextSplit, class_names: list[str]) -> torch.Tensor:
    """Each row's class index; a label outside the classes is one line naming its file and line."""
    index = {name: i for i, name in enumerate(class_names)}
    if all(_is_int(n) and int(n) == i for i, n in enumerate(class_names)):  # integer classes: "1" and "01" alike
        index.update({v: int(v) for v in set(split.labels) if _is_int(v) and 0 <= int(v) < len(class_names)})
    out = np.empty(len(split.labels), dtype=np.int64)
    for i, label in enumerate(split.labels):
        if label not in index:
            raise EdgepipeError(f"{split.path}: line {split.lines[i]}: label '{label}' is not one of the "
                                f"{len(class_names)} classes ({', '.join(class_names[:10])}"
                                f"{', ...' if len(class_names) > 10 else ''}); fix the row, or list every class in "
                                "data.classes")
        out[i] = index[label]
    return torch.from_numpy(out)


# --- tokenisation ------------------------------------------------------------------------------------------------
def tokenize(tokenizer: Any, split: TextSplit, max_length: int) -> dict[str, list[np.ndarray]]:
    """Each text's token ids (and token type ids where the tokenizer makes them), truncated at ``max_length``."""
    enc = tokenizer(split.texts, truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False)
    out = {"input_ids": [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]}
    if "token_type_ids" in enc and "token_type_ids" in getattr(tokenizer, "model_input_names", INPUT_NAMES):
        out["token_type_ids"] = [np.asarray(t, dtype=np.int32) for t in enc["token_type_ids"]]
    empty = next((i for i, ids in enumerate(out["input_ids"]) if len(ids) == 0), None)
    if empty is not None:
        raise EdgepipeError(f"{split.path}: line {split.lines[empty]}: the tokenizer makes no token of this text; "
                            "check that the tokenizer is the model's")
    return out


def pad_batch(rows: dict[str, list[np.ndarray]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """The rows padded to their longest (or ``length``) as int64 tensors, with the attention mask."""
    ids = rows["input_ids"]
    n, width = len(ids), length or max(len(r) for r in ids)
    out = {"input_ids": torch.full((n, width), pad_id, dtype=torch.int64),
           "attention_mask": torch.zeros(n, width, dtype=torch.int64)}
    types = rows.get("token_type_ids")
    if types is not None:
        out["token_type_ids"] = torch.zeros(n, width, dtype=torch.int64)
    for i, r in enumerate(ids):
        k = min(len(r), width)
        out["input_ids"][i, :k] = torch.from_numpy(r[:k].astype(np.int64))
        out["attention_mask"][i, :k] = 1
        if types is not None:
            out["token_type_ids"][i, :k] = torch.from_numpy(types[i][:k].astype(np.int64))
    return out


def _take(rows: dict[str, list[np.ndarray]], idx: Any) -> dict[str, list[np.ndarray]]:
    return {k: [v[int(i)] for i in idx] for k, v in rows.items()}


@dataclass
class TextBundle(Batches):
    """Both splits tokenised in memory (see the module docstring); batches are padded as they are cut."""

    train_tokens: dict[str, list[np.ndarray]]
    train_labels: torch.Tensor
    val_tokens: dict[str, list[np.ndarray]]
    val_labels: torch.Tensor
    class_names: list[str]
    pad_id: int
    max_length: int
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    choice: Batches | None = field(default=None, repr=False)
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(0))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n in INPUT_NAMES if n != "token_type_ids" or "token_type_ids" in self.train_tokens)

    @property
    def input_shape(self) -> tuple[int]:  # type: ignore[override]
        """The longest sequence a model is given (every batch is at most this long)."""
        return (self.max_length,)

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def val_size(self) -> int:
        return len(self.val_labels)

    def train_labels_array(self) -> np.ndarray:
        return self.train_labels.numpy()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        raise EdgepipeError("text data has no pixels to normalise")

    def _padded(self, tokens: dict[str, list[np.ndarray]], idx: Any, length: int | None = None
                ) -> dict[str, torch.Tensor]:
        return pad_batch(_take(tokens, idx), self.pad_id, length)

    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        order, _ = epoch_order(self.train_size, self.seed, epoch)
        for i in batch_starts(len(order), batch_size):
            idx = shard_of(order[i:i + batch_size], shard)
            yield self._padded(self.train_tokens, idx), self.train_labels[idx]

    def val_batches(self, batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for i in range(0, self.val_size, batch_size):
            idx = range(i, min(i + batch_size, self.val_size))
            yield self._padded(self.val_tokens, idx), self.val_labels[i:i + batch_size]

    def val_numpy(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for x, y in self.val_batches(batch_size):
            yield {k: v.numpy() for k, v in x.items()}, y.numpy()

    def calibration_batches(self, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        order = self.calibration_order(n, batch_size)
        return [self._padded(self.train_tokens, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]

    def val_head(self, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:  # type: ignore[override]
        """The first ``n`` validation sentences padded to ``max_length`` (a device's fixed-shape feed) and their
        labels."""
        idx = range(min(n, self.val_size))
        x = self._padded(self.val_tokens, idx, self.max_length)
        return {k: v.numpy() for k, v in x.items()}, self.val_labels[:len(idx)].numpy()

    def subset(self, n_train: int, n_val: int) -> TextBundle:
        tr = class_spread(self.train_labels.numpy(), n_train)
        va = class_spread(self.val_labels.numpy(), n_val)
        out = replace(self, train_tokens=_take(self.train_tokens, tr), train_labels=self.train_labels[tr],
                      val_tokens=_take(self.val_tokens, va), val_labels=self.val_labels[va], choice=None)
        if self.choice is not None:
            out.choice = replace(self.choice, train_tokens=out.train_tokens, train_labels=out.train_labels)
        return out

    def split_train(self, keep: np.ndarray, held_out: np.ndarray) -> TextBundle:
        kept = replace(self, train_tokens=_take(self.train_tokens, keep), train_labels=self.train_labels[keep],
                       choice=None)
        kept.choice = replace(kept, val_tokens=_take(self.train_tokens, held_out),
                              val_labels=self.train_labels[held_out])
        return kept

    def with_choice(self, tokens: dict[str, list[np.ndarray]], labels: torch.Tensor) -> TextBundle:
        """This data with ``tokens``/``labels`` (a split of their own, e.g. dev) as the split choices are made on."""
        out = replace(self, choice=None)
        out.choice = replace(out, val_tokens=tokens, val_labels=labels)
        return out


def token_lengths(tokens: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Sequence lengths of a split (tokens, special tokens included): what padding and latency depend on."""
    lengths = np.array([len(r) for r in tokens["input_ids"]])
    return {"median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}


# --- the embedded default's task ----------------------------------------------------------------------------------
POSITIVE = ("good", "great", "fine", "lovely", "superb", "bright", "warm", "clever", "funny", "moving")
NEGATIVE = ("bad", "dull", "awful", "poor", "weak", "bleak", "cold", "stale", "silly", "boring")
NOUNS = ("film", "story", "cast", "plot", "script", "ending", "score", "music", "pace", "hero")
FILLER = ("the", "a", "this", "its", "very", "quite", "really", "at", "times", "overall")
VERBS = ("was", "is", "seems")
NEGATION = ("not", "never", "hardly")
JOINERS = ("and", "but")
SYNTHETIC_VOCAB = tuple(sorted(set(POSITIVE + NEGATIVE + NOUNS + FILLER + VERBS + NEGATION + JOINERS)))


def synthetic_split(n: int, seed: int, name: str) -> TextSplit:
    """``n`` generated sentences labelled ``negative``/``positive``, each one or two opinion clauses ("the plot was
    not dull"), a negation flipping its clause's polarity. Two clauses joined by "and" are labelled by the sign of
    their sum (ties drawn again); joined by "but", by the second clause alone ("the cast is great but the script is
    dull" is negative), so word order decides what a bag of words cannot. Deterministic in (seed, name)."""
    rng = np.random.default_rng([seed, sum(name.encode())])

    def clause() -> tuple[list[str], int]:
        positive, negated = bool(rng.random() < 0.5), bool(rng.random() < 0.3)
        words = [str(rng.choice(FILLER)), str(rng.choice(NOUNS)), str(rng.choice(VERBS))]
        if rng.random() < 0.3:
            words.append(str(rng.choice(("very", "quite", "really"))))
        if negated:
            words.append(str(rng.choice(NEGATION)))
        words.append(str(rng.choice(POSITIVE if positive else NEGATIVE)))
        return words, (1 if positive else -1) * (-1 if negated else 1)

    texts, labels = [], []
    while len(texts) < n:
        words, score = clause()
        if rng.random() < 0.6:
            joiner = str(rng.choice(JOINERS))
            second, other = clause()
            words += [joiner, *second]
            score = other if joiner == "but" else score + other
        if score == 0:
            continue
        texts.append(" ".join(words))
        labels.append("positive" if score > 0 else "negative")
    return TextSplit(f"<synthetic {name}>", texts, labels, list(range(1, n + 1)))
