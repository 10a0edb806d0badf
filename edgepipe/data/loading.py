"""The data of a run: ``load_data`` picks the source (digits, or an ImageFolder held in memory or streamed),
``run_data`` loads it for a pipeline config, ``data_fingerprint`` keys the stages by the data files, and
``teacher_channels`` reads how many channels the teacher takes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgepipe.config import DataConfig
from edgepipe.data.batches import Batches, DataBundle
from edgepipe.data.digits import digits_bundle
from edgepipe.data.imagefolder import decode_split, list_split, same_size
from edgepipe.data.streaming import streamed_imagefolder, streaming_choice
from edgepipe.errors import EdgepipeError

if TYPE_CHECKING:
    from edgepipe.config import PipelineConfig


def data_fingerprint(cfg: DataConfig) -> str:
    """What the data files are, cheaply: for an ImageFolder, every file's path, size and modification time
    under its train and validation splits (a stat per file, no reading); for digits, scikit-learn's version.
    Part of every data-dependent stage key, so replaced or added images retrain instead of passing as
    "unchanged"."""
    digest = hashlib.sha256()
    if cfg.kind in ("digits", "digit-canvases"):
        import sklearn

        digest.update(f"sklearn {sklearn.__version__} load_digits".encode())
        if cfg.kind != "digits":
            digest.update(cfg.kind.encode())
        return digest.hexdigest()
    root = Path(cfg.path or "")
    # an ImageFolder's two split folders (and a folder of unlabeled images); a detection set's whole root
    folders = [root / cfg.train_split, root / cfg.val_split] if cfg.kind == "imagefolder" else [root]
    if cfg.unlabeled and cfg.unlabeled != "rest":
        folders.append(Path(cfg.unlabeled))
    for base in folders:
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_data(cfg: DataConfig, seed: int = 0, channels: int | None = None) -> Batches:
    """Load the dataset a config names; ``channels`` (1 or 3) when ``data.channels`` is not set (default 3)."""
    want = cfg.channels or channels or (1 if cfg.kind == "digits" else 3)
    if cfg.image_size:  # refused before a single image is resized to it
        from edgepipe.engine.sizes import check_input

        size = (want, cfg.image_size, cfg.image_size)
        if cfg.kind == "digits":
            check_input("data.image_size", 1797, size, "lower data.image_size (the digits are 8x8)",
                        "the digits set of")
        check_input("data.image_size", 1, size, "lower data.image_size", "even a batch of")
    if cfg.kind == "digits":
        bundle = digits_bundle(cfg, seed)
        if want == 3:
            bundle.train_images = bundle.train_images.repeat(1, 3, 1, 1)
            bundle.val_images = bundle.val_images.repeat(1, 3, 1, 1)
            bundle.mean, bundle.std = bundle.mean.expand(3).clone(), bundle.std.expand(3).clone()
        bundle.notes = {"channels": want}
    else:
        bundle = _imagefolder(cfg, seed, want)
    channels = bundle.input_shape[0]
    for name in ("mean", "std"):
        given = getattr(cfg, name)
        if given is not None and len(given) != channels:
            raise EdgepipeError(f"data.{name}: {len(given)} value(s) for images with {channels} channel(s); "
                                f"give one per channel")
    rest = None
    if cfg.unlabeled == "rest":
        from edgepipe.data.unlabeled import rest_of_training

        if not isinstance(bundle, DataBundle) or not cfg.limit_train or cfg.limit_train >= bundle.train_size:
            raise EdgepipeError("data.unlabeled: rest means the training images data.limit_train leaves out; set "
                                f"data.limit_train below the {bundle.train_size} training images (data held in memory)")
        rest = rest_of_training(bundle, cfg.limit_train)
    if cfg.limit_train or cfg.limit_val:
        bundle = bundle.subset(cfg.limit_train or bundle.train_size, cfg.limit_val or bundle.val_size)
    if rest is not None:
        bundle.unlabeled_images = rest
        bundle.notes = {**bundle.notes, "unlabeled": {"source": "rest: the training images data.limit_train leaves "
                                                                 "out, their labels unused", "images": len(rest)}}
    if cfg.val_from_train is not None:
        bundle = carve_held_out(bundle, cfg.val_from_train, cfg.val_from_train_seed)
    return bundle


def carve_held_out(bundle: Batches, size: float, seed: int) -> Batches:
    """``bundle`` training on the rest of its training images, with ``size`` of them (a fraction below 1, or a count)
    held out for choices (``Batches.choice_split``): stratified by class, drawn with ``seed``
    (scikit-learn's train_test_split). The draw depends on the labels and the seed alone, so runs at several run seeds
    choose on the same images. Recorded in ``notes["val_from_train"]``."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    labels = bundle.train_labels_array()
    n = len(labels)
    held = int(size) if size >= 1 else int(round(size * n))
    classes = len(np.unique(labels))
    if not classes <= held <= n - classes:
        raise EdgepipeError(f"data.val_from_train: {size:g} holds out {held} of {n} training images; a stratified "
                            f"split of {classes} classes needs between {classes} and {n - classes}: give a fraction "
                            "below 1 or a count in that range")
    keep, out = train_test_split(np.arange(n), test_size=held, random_state=seed, stratify=labels)
    carved = bundle.split_train(np.sort(keep), np.sort(out))
    carved.notes = {**bundle.notes, "val_from_train": {
        "images": int(held), "of": n, "training_images_left": int(n - held), "seed": seed, "stratified": True,
        "per_class": {bundle.class_names[c]: int(k) for c, k in zip(*np.unique(labels[out], return_counts=True))}}}
    return carved


def run_data(config: PipelineConfig) -> Batches:
    """The data of a run: ``data.channels``, or as many channels as the teacher's first layer takes. Every batch the
    run's settings cut from it must fit in memory (edgepipe.engine.sizes.check_batches), checked before one is cut."""
    from edgepipe.engine.sizes import check_batches

    data = load_data(config.data, seed=config.seed, channels=teacher_channels(config))
    check_batches(config, data.train_size, data.val_size, tuple(data.input_shape))
    return data


_CHANNELS: dict[str, int | None] = {}


def teacher_channels(config: PipelineConfig) -> int | None:
    """Input channels of the teacher's first layer (None when it takes neither 1 nor 3, or has no such layer)."""
    if config.data.channels:
        return config.data.channels
    spec = config.teacher.model
    key = spec.model_dump_json()
    if key not in _CHANNELS:
        if spec.arch and "in_channels" in spec.kwargs:
            found = spec.kwargs["in_channels"]
        else:
            from edgepipe.models.loading import build_from_spec
            from edgepipe.engine.sizes import meta_model

            # a registered architecture on the meta device: its shapes, before its size is checked
            # (edgepipe.engine.sizes)
            model = meta_model(spec, "teacher.model") if spec.arch else build_from_spec(spec)
            found = next((m.in_channels for m in model.modules()
                          if isinstance(getattr(m, "in_channels", None), int)), None)
            if found is None and spec.arch:
                found = 3  # a registered architecture without in_channels kwarg: torchvision's RGB models
        _CHANNELS[key] = found if found in (1, 3) else None
    return _CHANNELS[key]


def _imagefolder(cfg: DataConfig, seed: int, channels: int) -> Batches:
    """Both splits of an ImageFolder, decoded in memory or streamed (``streaming_choice`` says which)."""
    root = Path(cfg.path)  # type: ignore[arg-type]
    train, val = list_split(root / cfg.train_split), list_split(root / cfg.val_split)
    if train.classes != val.classes:
        only = [f"only in {split}/: {', '.join(sorted(set(a) - set(b)))}" for split, a, b in
                ((cfg.train_split, train.classes, val.classes), (cfg.val_split, val.classes, train.classes))
                if set(a) - set(b)]
        raise EdgepipeError(f"{root}: class folders of {cfg.train_split}/ and {cfg.val_split}/ differ "
                            f"({'; '.join(only)}); give both splits the same class folders")
    stream, reason = streaming_choice(cfg, train, val, channels)
    if stream:
        if cfg.unlabeled:
            raise EdgepipeError(f"data.unlabeled: needs the images in memory, and this data streams ({reason}); set "
                                "data.streaming: false (and raise data.memory_limit_mb) or remove data.unlabeled")
        return streamed_imagefolder(cfg, seed, channels, train, val, reason)
    tr_x, tr_y, classes, tr_notes = decode_split(train.root, cfg.image_size, channels, cfg.strict, cfg.crop_fraction,
                                                 train)
    va_x, va_y, _, va_notes = decode_split(val.root, cfg.image_size, channels, cfg.strict, cfg.crop_fraction, val)
    same_size(root, cfg, tuple(tr_x.shape[2:]), tuple(va_x.shape[2:]))
    tr, va = torch.from_numpy(tr_x), torch.from_numpy(va_x)
    if cfg.mean and cfg.std:
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    else:
        f = tr.float() / 255.0
        mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3))
    unlabeled, un_notes = None, None
    if cfg.unlabeled and cfg.unlabeled != "rest":
        from edgepipe.data.unlabeled import folder_images

        unlabeled, un_notes = folder_images(cfg, channels, train, tuple(tr.shape[1:]))
    return DataBundle(tr, torch.from_numpy(tr_y), va, torch.from_numpy(va_y), mean, std, classes,
                      augment=cfg.augment, hflip=cfg.hflip, pad=max(1, tr.shape[-1] // 8), seed=seed,
                      notes={"channels": channels, "streaming": {"on": False, "reason": reason},
                             cfg.train_split: tr_notes, cfg.val_split: va_notes,
                             **({"unlabeled": {"source": str(cfg.unlabeled), **un_notes}} if un_notes else {})},
                      unlabeled_images=unlabeled)
