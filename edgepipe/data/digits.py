"""scikit-learn's ``digits`` set (embedded: 1,797 8x8 grey images, no download) as a ``DataBundle``."""
from __future__ import annotations

import numpy as np
import torch

from edgepipe.config import DataConfig
from edgepipe.data.batches import DataBundle


def digits_bundle(cfg: DataConfig, seed: int) -> DataBundle:
    """The digits as one grey channel in [0, 1], split by ``data.val_fraction`` (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, va = train_test_split(np.arange(len(labels)), test_size=cfg.val_fraction, random_state=seed,
                              stratify=d.target)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    if cfg.image_size and cfg.image_size != 8:
        images = torch.nn.functional.interpolate(images, size=cfg.image_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.mean) if cfg.mean else images[tr].mean(dim=(0, 2, 3))
    std = torch.tensor(cfg.std) if cfg.std else images[tr].std(dim=(0, 2, 3))
    return DataBundle(images[tr], labels[tr], images[va], labels[va], mean, std,
                      [str(i) for i in range(10)], augment=cfg.augment, hflip=False,
                      pad=max(1, (cfg.image_size or 8) // 8), seed=seed)
