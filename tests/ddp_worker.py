"""One rank of the DDP equivalence tests (tests/test_distributed.py), started by torchrun or as a plain process.

``python tests/ddp_worker.py MODE OUT``: MODE ``full`` trains TinyCNN (two BatchNorms) for 3 epochs on tiny_data;
``interrupt`` stops at the first batch of epoch 2 (after epoch 1's checkpoint); ``resume`` finishes from that
checkpoint. Rank 0 saves the weights, the history and the validation top-1 to OUT/MODE-<world size>.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from edgepipe.training import distributed
from edgepipe.config import OptimConfig
from edgepipe.training.loop import fit
from edgepipe.tasks.classification import cross_entropy_step, evaluate
from tests.support import TinyCNN, tiny_data


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    distributed.init_from_env()
    torch.manual_seed(0)
    model, data = TinyCNN(width=8, num_classes=4), tiny_data(n_train=256, n_val=64)
    cfg = OptimConfig(epochs=3, lr=0.05, autocast="off")  # fp32 on every CPU

    # Each run its own checkpoints, but for ``resume``, which finishes the 2-rank ``interrupt`` run's.
    checkpoints = out / ("interrupt-2" if mode == "resume" else f"{mode}-{distributed.world_size()}")

    def stop(task: str, done: int, total: int, values: dict) -> None:
        if mode == "interrupt" and task.startswith("train epoch 2/"):
            raise KeyboardInterrupt

    with distributed.collective():
        try:
            history = fit(model, data, cfg, cross_entropy_step, batch_size=32, checkpoint_dir=checkpoints,
                          progress=stop, eval_batch_size=16)
        except KeyboardInterrupt:
            return 0
        top1 = evaluate(model, data, 16)
    if distributed.is_main():
        torch.save({"state": model.state_dict(), "history": history, "top1": top1},
                   out / f"{mode}-{distributed.world_size()}.pt")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
