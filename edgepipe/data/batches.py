"""What the stages read from a dataset (``Batches``) and the in-memory form of it (``DataBundle``).

Also the order every loader shares: ``epoch_order`` (a permutation drawn from seed and epoch only),
``batch_starts`` (full batches), ``shard_of`` (a rank's slice of a global batch) and ``class_spread`` (a
class-balanced subset), so in-memory and streamed data serve the same batches in the same order.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from edgepipe.errors import EdgepipeError


def epoch_order(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
    """The training order of one epoch (a function of seed and epoch only) and the generator after drawing it."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen), gen


def batch_starts(n: int, batch_size: int) -> range:
    """Start of every full batch (the last partial one is dropped; a set smaller than one batch is one batch)."""
    return range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size)


def shard_of(idx: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """Rank ``shard[0]``'s part of one global batch among ``shard[1]`` ranks: a contiguous, disjoint slice."""
    rank, world = shard
    if world == 1:
        return idx
    if len(idx) % world:
        raise EdgepipeError(f"data.batch_size: a batch of {len(idx)} does not split evenly over {world} processes; "
                            f"give a batch size divisible by {world}")
    per = len(idx) // world
    return idx[rank * per:(rank + 1) * per]


class Batches(abc.ABC):
    """What the stages read from a dataset, whichever way it is held (in memory or streamed): an abstract base,
    implemented by DataBundle and StreamingBundle."""

    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    notes: dict[str, Any]
    choice: Batches | None = None
    """The same data with the held-out split carved from training (data.val_from_train) as its validation set; None:
    choices are made on the validation split itself (``choice_split``)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image as the models receive it."""

    @property
    @abc.abstractmethod
    def train_size(self) -> int:
        """Number of training images."""

    @property
    @abc.abstractmethod
    def val_size(self) -> int:
        """Number of validation images."""

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def choice_split(self) -> Batches:
        """The data every choice is scored on (each epoch's validation metric, sweeps, the gain check, the accuracy
        budget): its ``val_*`` methods serve the held-out split when data.val_from_train carved one, else this data."""
        return self.choice if self.choice is not None else self

    def train_labels_array(self) -> np.ndarray:
        """Every training image's label, in dataset order."""
        raise NotImplementedError

    @property
    def unlabeled_size(self) -> int:
        """Images without labels that distillation may add (data.unlabeled)."""
        return 0

    def with_unlabeled(self) -> Batches:
        """The training set with the unlabeled images added, labelled -1 (``edgepipe.data.unlabeled.UNLABELED``: the
        hard term ignores them); this data itself when it has none."""
        return self

    def split_train(self, keep: np.ndarray, held_out: np.ndarray) -> Batches:
        """This data trained on ``keep`` (training indices) alone, with ``choice`` validating on ``held_out``."""
        raise NotImplementedError(f"{type(self).__name__} cannot carve a held-out split")

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.train_size // batch_size)

    @abc.abstractmethod
    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled (and augmented) training batches; the order depends only on seed and epoch.
        ``shard=(rank, world)`` yields that rank's slice of every global batch of ``batch_size``."""

    @abc.abstractmethod
    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation set in file order, normalized, never augmented."""

    def val_numpy(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in self.val_batches(batch_size):
            yield x.numpy(), y.numpy()

    def calibration_order(self, n: int, batch_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7)  # type: ignore[attr-defined]
        return torch.randperm(self.train_size, generator=gen)[: n * batch_size]

    @abc.abstractmethod
    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        """``n`` un-augmented training batches (fixed order) for range calibration."""

    @abc.abstractmethod
    def val_head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` validation images as stored (uint8 [n, C, H, W], or float in [0, 1]) and their labels."""

    @abc.abstractmethod
    def subset(self, n_train: int, n_val: int) -> Batches:
        """The same data limited to ``n_train`` training and ``n_val`` validation images, every class in turn
        (``class_spread``)."""


@dataclass
class DataBundle(Batches):
    """Every image decoded in memory; batches are cut, normalized and augmented as whole tensors."""

    train_images: torch.Tensor
    """uint8 or float [N, C, H, W] in [0, 255] (uint8) or [0, 1] (float)."""
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    class_names: list[str]
    augment: bool = True
    hflip: bool = True
    pad: int = 4
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    """How the files became tensors: channels, source image modes, files skipped as unreadable (per split)."""
    choice: Batches | None = field(default=None, repr=False)
    unlabeled_images: torch.Tensor | None = field(default=None, repr=False)
    """Images without labels (data.unlabeled), stored as ``train_images`` are; only ``with_unlabeled`` trains on them."""

    def train_labels_array(self) -> np.ndarray:
        return self.train_labels.numpy()

    @property
    def unlabeled_size(self) -> int:
        return 0 if self.unlabeled_images is None else len(self.unlabeled_images)

    def with_unlabeled(self) -> DataBundle:
        if self.unlabeled_images is None:
            return self
        n = len(self.unlabeled_images)
        return replace(self, train_images=torch.cat([self.train_images, self.unlabeled_images.to(self.train_images.dtype)]),
                       train_labels=torch.cat([self.train_labels, torch.full((n,), -1, dtype=self.train_labels.dtype)]),
                       unlabeled_images=None)

    def split_train(self, keep: np.ndarray, held_out: np.ndarray) -> DataBundle:
        k, h = torch.from_numpy(keep), torch.from_numpy(held_out)
        kept = replace(self, train_images=self.train_images[k], train_labels=self.train_labels[k], choice=None)
        kept.choice = replace(kept, val_images=self.train_images[h], val_labels=self.train_labels[h])
        return kept

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def val_size(self) -> int:
        return len(self.val_labels)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop from a reflect-padded copy (per-sample offsets), then random horizontal flip."""
        n, c, h, w = x.shape
        p = self.pad
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (n, 1), generator=gen)
            rows = (dy + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
            cols = (dx + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
            x = padded.gather(2, rows).gather(3, cols)
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x

    def train_batches(self, batch_size: int, epoch: int, augment: bool | None = None, shard: tuple[int, int] = (0, 1),
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, gen = epoch_order(self.train_size, self.seed, epoch)
        aug = self.augment if augment is None else augment
        for i in batch_starts(len(order), batch_size):
            idx = shard_of(order[i:i + batch_size], shard)
            x = self.normalize(self.train_images[idx])
            if aug:
                x = self._augment(x, gen)
            yield x, self.train_labels[idx]

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.val_labels), batch_size):
            yield self.normalize(self.val_images[i:i + batch_size]), self.val_labels[i:i + batch_size]

    def calibration_batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        order = self.calibration_order(n, batch_size)
        return [self.normalize(self.train_images[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]

    def val_head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.val_images[:n].numpy(), self.val_labels[:n].numpy()

    def subset(self, n_train: int, n_val: int) -> DataBundle:
        tr = torch.from_numpy(class_spread(self.train_labels.numpy(), n_train))
        va = torch.from_numpy(class_spread(self.val_labels.numpy(), n_val))
        out = replace(self, train_images=self.train_images[tr], train_labels=self.train_labels[tr],
                      val_images=self.val_images[va], val_labels=self.val_labels[va], choice=None)
        if self.choice is not None:  # the held-out split is kept whole: its images are no training images
            out.choice = replace(self.choice, train_images=out.train_images, train_labels=out.train_labels)
        return out


def class_spread(labels: np.ndarray, n: int) -> np.ndarray:
    """The indices, in dataset order, of ``n`` samples taken from every class in turn (each class's first ones).

    An ImageFolder lists its files class by class, so its first N images are one or two classes: a run limited
    with data.limit_train / limit_val would train and score on a set that says nothing. Taking the classes in
    turn keeps them balanced (to one sample) and the choice deterministic."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    within = np.empty(len(labels), dtype=np.int64)  # each sample's place within its class
    within[order] = np.arange(len(labels)) - np.searchsorted(ordered, ordered, side="left")
    return np.sort(np.lexsort((labels, within))[:n])
