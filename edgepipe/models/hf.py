"""Hugging Face models as teachers and students (``model: {hf: PATH}``): a BERT-family encoder folder, as a user's
``save_pretrained`` directory arrives, loaded offline with a sequence-classification head for the data's classes.

- **Loading** is ``transformers``' own (``AutoConfig``/``AutoModelForSequenceClassification``/``AutoTokenizer``
  ``from_pretrained`` with ``local_files_only=True``: nothing reaches a hub). A folder with weights
  (``model.safetensors``; a pickled ``pytorch_model.bin`` is refused, as every pickle is) loads them and adds a new
  classification head; a folder with a ``config.json`` alone is initialised from the run's seed (the embedded
  default's tiny BERT). The head's size is ``kwargs.num_labels``, which the stages fill from the data's classes;
  any other ``kwargs`` are config fields changed (a smaller student of the family), initialised from the seed.
- **The model edgepipe handles** is ``HFClassifier``: the transformers model behind a forward that takes
  ``(input_ids, attention_mask, token_type_ids)`` positionally and returns one logits tensor, which is what the
  engine, ONNX export and the runtimes need (a ``ModelOutput`` is not a tensor).
- **The tokenizer must be the model's**: ``check_tokenizer`` refuses a tokenizer whose ids do not fit the model's
  embeddings (one line naming both folders).
- **The embedded default** (``hf: embedded:tiny-bert``) is a folder this module writes once into edgepipe's cache:
  a 2-layer BERT config (hidden 64, 4 heads) and a word-level tokenizer over the synthetic task's vocabulary
  (``edgepipe.data.text.SYNTHETIC_VOCAB``) with BERT's special tokens, built with ``tokenizers``. It is a real model
  folder, so the embedded pipeline goes through the same loading code as a user's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write_text

EMBEDDED = "embedded:tiny-bert"
EMBEDDED_CONFIG = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                   "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                   "max_position_embeddings": 64, "type_vocab_size": 2, "initializer_range": 0.02,
                   "layer_norm_eps": 1e-12, "pad_token_id": 0}
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise EdgepipeError("model.hf: Hugging Face models need the transformers package; install edgepipe's text "
                            "extra: pip install -e '.[text]'") from None
    transformers.logging.set_verbosity_error()  # "some weights were newly initialised": the head, said in our records
    transformers.utils.logging.disable_progress_bar()  # its per-file loading bars; edgepipe shows its own progress
    return transformers


def resolve_folder(hf: str) -> Path:
    """The model folder an ``hf:`` names (the embedded default written on first use), checked to be a folder with a
    config.json."""
    folder = embedded_folder() if hf == EMBEDDED else Path(hf).expanduser()
    if not folder.is_dir():
        raise EdgepipeError(f"{folder}: model.hf is not a folder; give a Hugging Face model folder (config.json, "
                            f"weights, tokenizer files), e.g. one written by save_pretrained, or {EMBEDDED}")
    if not (folder / "config.json").is_file():
        raise EdgepipeError(f"{folder}: no config.json; model.hf must be a Hugging Face model folder "
                            "(save_pretrained writes config.json beside the weights)")
    return folder


def has_weights(folder: Path) -> bool:
    return any((folder / f).exists() for f in WEIGHT_FILES)


class HFClassifier(nn.Module):
    """A transformers sequence classifier as edgepipe's stages call models: positional int64 inputs, one logits
    tensor out (see the module docstring)."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        # A trimmed vocabulary's lookup (trim_vocabulary): the tokenizer's id -> the row of the kept embeddings. A
        # buffer, so it travels in the state dict and into ONNX as one Gather before the embedding's.
        self.register_buffer("token_map", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.is_floating_point():
            # What shape-only tools build from an artifact's input_shape ([max_length]): the MAC and parameter
            # counter, the activation-traffic and roofline estimates. Read as token ids (0 where negative), every
            # token attended: a sentence of max_length tokens, the length those figures are stated at.
            input_ids = input_ids.long().clamp_(min=0)
        if self.token_map is not None:  # index_select: one ONNX Gather (advanced indexing exports as several ops)
            input_ids = self.token_map.index_select(0, input_ids.reshape(-1)).view_as(input_ids)
        kwargs = {"attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(input_ids=input_ids, **kwargs).logits

    @property
    def config(self) -> Any:
        return self.model.config

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        mapped = state_dict.get(prefix + "token_map")
        if mapped is not None and self.token_map is None:  # a trimmed model's weights into the folder's architecture
            self.token_map = torch.empty_like(mapped)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attention_modules(self) -> list[nn.Module]:
        """Each encoder layer's self-attention (the module holding query, key and value)."""
        return [m for m in self.model.modules() if all(hasattr(m, a) for a in ("query", "key", "value",
                                                                                 "attention_head_size"))]

    def encoder_layers(self) -> list[nn.Module]:
        return list(self.model.base_model.encoder.layer)

    def sync_shapes(self) -> None:
        """After structured pruning, or loading a pruned model's weights into the folder's architecture: each
        attention's head count follows its query's width (whole heads are removed; the head size never changes), and
        the config states the embeddings' vocabulary and width (layers may differ: their widths are the weights')."""
        for attention in self.attention_modules():
            attention.all_head_size = int(attention.query.out_features)
            attention.num_attention_heads = attention.all_head_size // int(attention.attention_head_size)
        embeddings = self.model.get_input_embeddings()
        self.model.config.vocab_size = int(embeddings.num_embeddings)
        self.model.config.hidden_size = int(embeddings.embedding_dim)

    def shape_record(self) -> dict[str, Any]:
        """What structured pruning changed, layer by layer: heads, FFN width; and the vocabulary and hidden size."""
        embeddings = self.model.get_input_embeddings()
        layers = self.encoder_layers()
        return {"vocabulary": int(embeddings.num_embeddings), "hidden_size": int(embeddings.embedding_dim),
                "heads": [int(a.num_attention_heads) for a in self.attention_modules()],
                "ffn": [int(layer.intermediate.dense.out_features) for layer in layers],
                "trimmed_vocabulary": self.token_map is not None}


def load_classifier(hf: str, num_labels: int | None, overrides: dict[str, Any] | None = None) -> HFClassifier:
    """The folder's encoder with a sequence-classification head of ``num_labels`` classes (its weights loaded when
    the folder has them; otherwise initialised from torch's current seed). ``overrides``: config fields changed
    (a smaller student of the same family, e.g. ``num_hidden_layers: 1``): built from the config, not the weights."""
    if not num_labels:
        raise EdgepipeError(f"model.hf {hf}: the classification head's size is not known; the stages fill "
                            "kwargs.num_labels from the data's classes (give it in the model's kwargs when building "
                            "one by hand)")
    tf = _transformers()
    folder = resolve_folder(hf)
    overrides = dict(overrides or {})
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True, num_labels=int(num_labels))
    except (OSError, ValueError, KeyError) as e:
        raise EdgepipeError(f"{folder / 'config.json'}: not a transformers config ({str(e).splitlines()[0][:200]})"
                            ) from None
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise EdgepipeError(f"model.kwargs: {', '.join(unknown)} is not a field of {folder / 'config.json'} "
                            f"({config.model_type}); give config fields such as num_hidden_layers, hidden_size")
    for k, v in overrides.items():
        setattr(config, k, v)
    if overrides:  # another shape than the folder's weights: built from the config, initialised from the seed
        model = tf.AutoModelForSequenceClassification.from_config(config)
    elif has_weights(folder):
        try:
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                folder, config=config, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise EdgepipeError(f"{folder}: the weights do not load into a {config.model_type} sequence classifier "
                                f"({str(e).splitlines()[0][:200]})") from None
    elif any((folder / f).exists() for f in PICKLED_WEIGHTS):
        raise EdgepipeError(f"{folder}: holds pickled weights (pytorch_model.bin), which can run code when loaded; "
                            "convert them to model.safetensors (save_pretrained(..., safe_serialization=True))")
    else:
        model = tf.AutoModelForSequenceClassification.from_config(config)
    names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids")
                  if n != "token_type_ids" or getattr(config, "type_vocab_size", 0) > 0)
    return HFClassifier(model, names)


def init_from_teacher(student: HFClassifier, teacher: HFClassifier) -> dict[str, Any]:
    """A shallower student of the teacher's family started from the teacher: the embeddings, pooler and classifier
    copied, and each student encoder layer from one of the teacher's, evenly spaced and always the first and the last
    (DistilBERT takes every other layer of BERT, Sanh et al. 2019). Widths must match (hidden size, heads, FFN): a
    narrower student is made by pruning the teacher, not by copying it."""
    t_cfg, s_cfg = teacher.config, student.config
    for field in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(t_cfg, field, None) != getattr(s_cfg, field, None):
            raise EdgepipeError(f"distill.init: teacher: the student's {field} is {getattr(s_cfg, field, None)}, the "
                                f"teacher's {getattr(t_cfg, field, None)}; a student initialised from the teacher "
                                "keeps its widths and drops layers (num_hidden_layers); or use init: random")
    n, m = int(t_cfg.num_hidden_layers), int(s_cfg.num_hidden_layers)
    if m > n:
        raise EdgepipeError(f"distill.init: teacher: the student has {m} layers, the teacher {n}")
    chosen = [round(i * (n - 1) / (m - 1)) if m > 1 else 0 for i in range(m)]
    t_state = teacher.state_dict()
    new = {}
    for key, value in student.state_dict().items():
        parts = key.split(".")
        source = key
        if "layer" in parts:  # <prefix>.encoder.layer.<i>.<...>
            at = parts.index("layer") + 1
            if at < len(parts) and parts[at].isdigit():
                source = ".".join([*parts[:at], str(chosen[int(parts[at])]), *parts[at + 1:]])
        found = t_state.get(source)
        if found is None or found.shape != value.shape:
            raise EdgepipeError(f"distill.init: teacher: student tensor '{key}' {tuple(value.shape)} has no match in "
                                f"the teacher ('{source}'); use the teacher's family and widths, or init: random")
        new[key] = found.clone()
    student.load_state_dict(new)
    return {"init": "teacher", "layers": chosen, "tensors": len(new)}


def trim_vocabulary(model: HFClassifier, used: Any, specials: list[int], unk_id: int) -> dict[str, Any]:
    """Keep the word embeddings of the token ids ``used`` (those the training data's tokenisation produces) and the
    tokenizer's special tokens; every other id reads [UNK]'s row. The model still takes the tokenizer's ids (a lookup
    table, ``token_map``, turns them into rows), so the tokenizer, the export and the device's token ids are
    unchanged. Embeddings are most of a small BERT's parameters (11.7M of MiniLM-L6's 22.7M), and a task's data uses a
    fraction of a 30k vocabulary. Written here: Hugging Face has resize_token_embeddings, which cuts the end of the
    table, not a chosen set of rows."""
    embeddings = model.model.get_input_embeddings()
    before = int(embeddings.num_embeddings)
    keep = sorted({int(i) for i in used} | {int(i) for i in specials} | {int(unk_id)})
    if keep[-1] >= before:
        raise EdgepipeError(f"prune.vocabulary: token id {keep[-1]} is past the model's {before} embeddings; the data "
                            "was tokenised with another tokenizer than the model's")
    rows = torch.tensor(keep, dtype=torch.long)
    new_row = torch.full((before,), keep.index(int(unk_id)), dtype=torch.long)
    new_row[rows] = torch.arange(len(keep))
    pad = embeddings.padding_idx
    trimmed = nn.Embedding(len(keep), embeddings.embedding_dim,
                           padding_idx=int(new_row[pad]) if pad is not None else None)
    trimmed.to(embeddings.weight.device)
    with torch.no_grad():
        trimmed.weight.copy_(embeddings.weight[rows.to(embeddings.weight.device)])
    model.model.set_input_embeddings(trimmed)
    old_map = model.token_map
    model.token_map = (new_row.to(old_map.device)[old_map] if old_map is not None else new_row).to(
        embeddings.weight.device)
    model.sync_shapes()
    return {"vocabulary_before": before, "vocabulary_after": len(keep), "from_data": len(set(int(i) for i in used)),
            "special_tokens": len(set(specials)), "unknown_id": int(unk_id),
            "embedding_params_removed": (before - len(keep)) * int(embeddings.embedding_dim)}


def load_tokenizer(hf: str) -> Any:
    """The folder's own tokenizer (fast), offline."""
    tf = _transformers()
    folder = resolve_folder(hf)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgepipeError(f"{folder}: no tokenizer loads from this folder ({str(e).splitlines()[0][:160]}); a "
                            "model folder for text needs its tokenizer files (tokenizer.json, tokenizer_config.json)"
                            ) from None
    if tokenizer.pad_token_id is None:
        raise EdgepipeError(f"{folder}: the tokenizer has no padding token; set pad_token in tokenizer_config.json")
    return tokenizer


def check_tokenizer(tokenizer: Any, config: Any, tokenizer_folder: str, model_folder: str) -> None:
    """Refuse a tokenizer that is not the model's: one whose ids reach past the model's embeddings."""
    size = len(tokenizer)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and size > vocab:
        raise EdgepipeError(f"{tokenizer_folder}: the tokenizer has {size} tokens but the model at {model_folder} "
                            f"embeds {vocab}; a text's ids would index past the embeddings: give the tokenizer the "
                            "model was trained with (data.tokenizer, or none: the teacher's folder)")


def vocab_of_data(tokens: dict[str, list[Any]]) -> int:
    """One more than the largest token id the data holds."""
    return 1 + max(int(r.max()) for r in tokens["input_ids"] if len(r))


# --- the embedded default -----------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE") or Path.home() / ".cache" / "edgepipe")


def embedded_folder() -> Path:
    """The embedded tiny BERT's model folder (config.json + tokenizer files), written once, atomically."""
    from edgepipe.data.text import SYNTHETIC_VOCAB

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *SYNTHETIC_VOCAB))}
    config = {**EMBEDDED_CONFIG, "vocab_size": len(vocab)}
    digest = hashlib.sha256(json.dumps([config, vocab], sort_keys=True).encode()).hexdigest()[:12]
    folder = _cache_root() / "hf" / f"tiny-bert-{digest}"
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    atomic_write_text(folder / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 64,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}, indent=2))
    atomic_write_text(folder / "tokenizer.json", tok.to_str())  # last: its presence marks the folder complete
    return folder
