"""The data-loading benchmark (``make bench-data``): peak memory and images/s of one distillation epoch on
synthetic ImageFolders of growing size, streamed and in memory.

For each size a fresh process runs what the distill stage runs for one epoch (``edgepipe.training.loop.fit`` with
``edgepipe.training.distillation.kd_step``: a teacher forward and a student step per batch) on the folder, then reports
its own peak resident memory (VmHWM, which includes the data checks and the epoch) and the largest peak of
its DataLoader workers (``RUSAGE_CHILDREN``). The models are small strided CNNs so that the figures follow the data
path, not the network. Results go into the ``data-loading`` section of BENCHMARKS.md, with the host.

This is a benchmark, not a test: 200,000 images take several minutes on two cores. The folders are generated
under ``--workdir`` (not part of the repository): images of smooth, class-coloured patterns plus noise, saved
as JPEG; the smaller sets are hard links to the first images of the largest.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10
VAL_IMAGES = 2000
BOUND = 0.25
"""The largest growth of streamed peak memory allowed from the smallest to the largest set (issue 12)."""

log = logging.getLogger("edgepipe.data.bench")


def make_folder(root: Path, train: int, size: int, source: Path | None = None, val: int = VAL_IMAGES) -> Path:
    """An ImageFolder of ``train`` training and ``val`` validation JPEGs (``size`` x ``size``, 10 classes).
    With ``source`` (a bigger one), its first images are hard-linked instead of generated."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", train), ("test", val)):
        per = n // CLASSES
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.stack([(yy * (c + 1) * 4) % 256, (xx * (CLASSES - c) * 4) % 256, np.full_like(yy, c * 25)], -1)
            for i in range(per):
                path = folder / f"{i:06d}.jpg"
                if path.exists():
                    continue
                if source is not None:
                    os.link(source / split / f"class{c}" / path.name, path)
                    continue
                pixels = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path, quality=85)
            log.info("%s: %s class %d/%d ready (%d images)", root, split, c + 1, CLASSES, per)
    done.write_text(f"{train}\n")
    return root


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:  # the process has just exited
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            found += [k, *_descendants(k)]
    return found


class TreeMemory(threading.Thread):
    """The peak of this process's and its descendants' (DataLoader workers') summed proportional set size, sampled
    every 0.1 s. PSS splits each shared page among the processes that map it, so a worker's copy-on-write pages
    shared with the main process are not counted twice, as summed RSS would."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib, self.samples, self._stop_event = 0, 0, threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.wait(0.1):
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in [me, *_descendants(me)]))
            self.samples += 1

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kib


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def small_cnn(width: int) -> Any:
    """Three strided 3x3 convolutions (BN, ReLU), global pooling, a linear layer: a network cheap enough on
    two cores that an epoch's time follows the data path (decode, augment, batch), which is what is measured."""
    from torch import nn

    layers, cin = [], 3
    for w in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(cin, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES))


def child(folder: Path, streaming: bool, batch_size: int, workers: int | None) -> dict[str, Any]:
    """One distillation epoch on ``folder``, in this process; returns its measurements."""
    import torch

    from edgepipe.config import DataConfig, OptimConfig
    from edgepipe.data.loading import load_data
    from edgepipe.training.distillation import SoftTargets, kd_step
    from edgepipe.training.loop import clear_checkpoints, fit

    torch.manual_seed(0)
    tree = TreeMemory()
    tree.start()
    t0 = time.perf_counter()
    data = load_data(DataConfig(kind="imagefolder", path=str(folder), streaming=streaming, workers=workers,
                                batch_size=batch_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    load_s = time.perf_counter() - t0
    teacher, student = small_cnn(32), small_cnn(16)
    ckpt = folder.parent / f"ckpt-{folder.name}-{streaming}"
    history = fit(student, data, OptimConfig(epochs=1, lr=0.05),
                  kd_step(SoftTargets(teacher), 4.0, 0.9), batch_size=batch_size, checkpoint_dir=ckpt,
                  task=f"distill epoch on {data.train_size} images", eval_batch_size=500)
    clear_checkpoints(ckpt)
    tree_kib = tree.stop()
    return {"images": data.train_size, "val_images": data.val_size, "streaming": streaming,
            "workers": data.notes["streaming"].get("workers", 0), "load_seconds": load_s,
            "epoch_seconds": history[0]["seconds"], "images_per_s": history[0]["images_per_s"],
            "peak_rss_mib": _peak_rss_kib() / 1024, "peak_tree_pss_mib": tree_kib / 1024,
            "tree_samples": tree.samples}


def measure(folder: Path, streaming: bool, batch_size: int, workers: int | None, cache: Path) -> dict[str, Any]:
    """``child`` in a fresh process (a peak is per process), with the decode cache in ``cache``."""
    cmd = [sys.executable, "-m", "edgepipe.data.bench", "--child", str(folder), "--batch-size", str(batch_size)]
    if streaming:
        cmd.append("--streaming")
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "EDGEPIPE_CACHE": str(cache)}
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "## Data loading: memory and speed of one distillation epoch",
        "",
        f"Command: `{meta['command']}` — {meta['date']}.",
        f"Host: {meta['cpu']}, ISA flags {meta['isa']}; torch {meta['torch']}.",
        "",
        f"Synthetic ImageFolders of {meta['image_size']}x{meta['image_size']} RGB JPEGs ({CLASSES} classes, plus "
        f"{VAL_IMAGES:,} validation images). One epoch of `edgepipe.training.loop.fit` with `kd_step` (teacher and student: "
        f"`edgepipe.data.bench.small_cnn` of width 32 and 16, so that the data path sets the pace; batch "
        f"{meta['batch_size']}, validation included), each in a fresh "
        "process. Peak RSS: the main process's VmHWM (file checks, epoch and validation). Peak total PSS: the "
        "largest sum, sampled every 0.1 s, of the proportional set size of the main process and its DataLoader "
        "workers (shared pages split among the processes that map them, so nothing is counted twice).",
        "",
        "| images | data path | workers | peak RSS, main (MiB) | peak total PSS, with workers (MiB) | images/s | "
        "epoch (s) | data ready (s) | load avg before |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['images']:,} | {'streamed' if r['streaming'] else 'in memory'} | {r['workers']} | "
                     f"{r['peak_rss_mib']:,.0f} | {r['peak_tree_pss_mib']:,.0f} | {r['images_per_s']:,.0f} | "
                     f"{r['epoch_seconds']:,.1f} | {r['load_seconds']:,.1f} | {r.get('load_before', float('nan')):.2f} |")
    streamed = [r for r in rows if r["streaming"]]
    if len(streamed) > 1:
        lo, hi = streamed[0], streamed[-1]
        lines.append("")
        for key, what in (("peak_rss_mib", "main-process peak RSS"), ("peak_tree_pss_mib", "peak total PSS")):
            growth = hi[key] / lo[key] - 1
            lines.append(f"Streamed, {what} grows {growth:+.1%} from {lo['images']:,} to {hi['images']:,} images: "
                         f"{'meets' if growth <= BOUND else 'MISSES'} the bound of +{BOUND:.0%}.")
    lines.append("")
    lines.append("'load avg before' is the 1-minute load average when the row started (2 cores: above ~0.5, "
                 "other work shared the CPU and images/s is low by that much; the memory figures do not depend on it). "
                 "'data ready' is the time to list and check (streamed: decode once, in the workers; remembered "
                 "afterwards) or decode (in memory) the files before the epoch; each size starts with an empty cache.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepipe.data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: data.workers' default)")
    p.add_argument("--in-memory", type=int, nargs="*", default=[10_000, 50_000],
                   help="sizes also run with every image held in memory, for comparison")
    p.add_argument("--workdir", type=Path, default=Path("runs/data-bench"))
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.child:
        print(json.dumps(child(args.child, args.streaming, args.batch_size, args.workers)))
        return 0

    import torch

    from edgepipe.reporting import formatting as fmt
    from edgepipe.host import host_cpu, host_isa

    sizes = sorted(args.sizes)
    biggest = make_folder(args.workdir / f"images-{sizes[-1]}", sizes[-1], args.image_size)
    rows = []
    for n in sizes:
        folder = biggest if n == sizes[-1] else make_folder(args.workdir / f"images-{n}", n, args.image_size, biggest)
        for streaming in (True, False):
            if not streaming and n not in args.in_memory:
                continue
            cache = args.workdir / f"cache-{n}-{streaming}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)  # every measurement decodes from the files
            log.info("measuring %d images, %s", n, "streamed" if streaming else "in memory")
            load = os.getloadavg()[0]  # other work on the machine slows the epoch: the row says how busy it was
            rows.append({**measure(folder, streaming, args.batch_size, args.workers, cache), "load_before": load})
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            log.info("%s", rows[-1])
    meta = {"command": "make bench-data", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": host_cpu(), "isa": ", ".join(host_isa()), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "image_size": args.image_size, "batch_size": args.batch_size}
    (args.workdir / "data-bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    fmt.replace_section(args.out, "data-loading", table(rows, meta))
    print(table(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
