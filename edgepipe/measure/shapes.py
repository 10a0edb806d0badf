"""Which student shape is fast enough: the INT8 throughput of CIFAR ResNet shapes against a teacher's FP32 and
INT8 graphs on this host (``make bench-shapes``), before any training is spent on them.

A benchmark bar such as "final >= 12x teacher-fp32 and >= 2.5x teacher-int8" is a property of the student's shape
and of the CPU, not of its weights: on a 2-core Intel Xeon with AMX the teacher's own INT8 graph ran 6.8x its FP32
one, and 12/24/48 channels ran slower than 16/32/64 (AMX tiles want multiples of 16), while on an AMD Zen 4 (VNNI,
no AMX) the teacher's INT8 ran ~3x its FP32 and narrower stages helped. So the shape is chosen per host from a
measurement, which this module makes.

Each shape (``DEPTH:W1,W2,W3``, a ``cifar_resnet`` with those stage widths) is built with random weights, exported
to ONNX (``edgepipe.export.onnx_export``) and quantized by NNCF (``post_training_quantize``, the ``ptq`` baseline's
route) on random calibration images; the teacher is exported as is (FP32) and quantized the same way. Random
weights and calibration change the ranges, not the graph OpenVINO compiles, so the timing is the trained model's
(the recipe's ``final`` row, QAT through ONNX QDQ, checks it). All graphs are compiled first, then timed in
alternating rounds (teacher FP32, teacher INT8, each shape, repeated), each at the batch of the benchmark's
throughput figure, with the target profile's threads, warm-up and iterations; a ratio is the median over rounds
of the per-round images/s ratio. Results go into the ``student-shapes`` section of ``--out`` with the host's CPU and
ISA.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgepipe.errors import EdgepipeError

log = logging.getLogger("edgepipe.measure.shapes")

SECTION = "student-shapes"


def parse_shape(text: str) -> tuple[int, tuple[int, int, int]]:
    """``DEPTH:W1,W2,W3`` (e.g. ``14:16,32,48``) -> (14, (16, 32, 48)); one clear line when it is not that."""
    try:
        depth, widths = text.split(":")
        stages = tuple(int(w) for w in widths.split(","))
        if len(stages) != 3 or int(depth) < 8 or (int(depth) - 2) % 6 or min(stages) < 1:
            raise ValueError
    except ValueError:
        raise EdgepipeError(f"--shape {text!r}: expected DEPTH:W1,W2,W3 with depth 6n+2 >= 8 and three channel counts "
                            "(e.g. 14:16,32,48)") from None
    return int(depth), stages  # type: ignore[return-value]


def _student(depth: int, widths: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    from edgepipe.models.zoo import cifar_resnet

    torch.manual_seed(0)
    return cifar_resnet(depth=depth, num_classes=num_classes, widths=list(widths)).eval()


def _graphs(model: torch.nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int, profile: Any,
            work: Path, threads: int, int8_only: bool) -> dict[str, Any]:
    """The model's FP32 graph (unless ``int8_only``) and its NNCF INT8 graph, compiled for the profile's CPU."""
    from edgepipe.backends import openvino as ov_backend
    from edgepipe.export.onnx_export import export_onnx
    from edgepipe.types import DType

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "float.onnx"
    onnx.save(export_onnx(model, input_shape, 17, num_classes=num_classes), str(onnx_path))
    images = np.random.default_rng(0).standard_normal((64, *input_shape)).astype(np.float32)
    artifact, _ = ov_backend.post_training_quantize(onnx_path, images, "performance", profile, folder / "int8",
                                                    {"input_shape": list(input_shape)}, lambda *a: None)
    out = {"int8": ov_backend.load(artifact, threads=threads)}
    if not int8_only:
        out["fp32"] = ov_backend.timing_runner(onnx_path, profile, DType.FP32, folder / "fp32", threads)
    return out


def measure_shapes(teacher: torch.nn.Module, shapes: list[tuple[int, tuple[int, int, int]]], profile: Any,
                   input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, batch: int = 64,
                   rounds: int = 5, warmup: int = 20, iterations: int = 100, threads: int = 2,
                   progress: Any = None) -> dict[str, Any]:
    """Throughput of each shape's INT8 graph against the teacher's FP32 and INT8 graphs, in alternating rounds."""
    from edgepipe.host import host_cpu, host_isa, library_versions
    from edgepipe.measure.figures import model_counts
    from edgepipe.runtime.runner import time_runner

    progress = progress or (lambda *a: None)
    with tempfile.TemporaryDirectory(prefix="edgepipe-shapes-") as tmp:
        work = Path(tmp)
        runners = {("teacher", k): r for k, r in _graphs(teacher, "teacher", input_shape, num_classes, profile, work,
                                                           threads, False).items()}
        counts = {}
        for depth, widths in shapes:
            name = f"{depth}:{','.join(map(str, widths))}"
            model = _student(depth, widths, num_classes)
            counts[name] = model_counts(model, input_shape)
            runners[(name, "int8")] = _graphs(model, f"s{len(counts)}", input_shape, num_classes, profile, work,
                                              threads, True)["int8"]
            progress("compile shapes", len(counts), len(shapes), {})
        feeds = {"input": np.random.default_rng(1).random((batch, *input_shape), dtype=np.float32)}
        per_round: list[dict[str, float]] = []
        for i in range(rounds):
            per_round.append({f"{n}/{k}": time_runner(r, feeds, warmup, iterations).images_per_s
                              for (n, k), r in runners.items()})
            progress("timing rounds", i + 1, rounds, {})
    rows = []
    for name, c in counts.items():
        mine = [r[f"{name}/int8"] for r in per_round]
        rows.append({"shape": name, "params": c["params"], "macs": c["macs"],
                     "images_per_s": float(np.median(mine)),
                     "x_teacher_fp32": float(np.median([m / r["teacher/fp32"] for m, r in zip(mine, per_round)])),
                     "x_teacher_int8": float(np.median([m / r["teacher/int8"] for m, r in zip(mine, per_round)]))})
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": host_cpu(),
            "isa": list(host_isa()), "libraries": library_versions(installed_only=True), "profile": profile.name,
            "batch": batch, "rounds": rounds, "warmup": warmup, "iterations": iterations, "threads": threads,
            "input_shape": list(input_shape), "teacher": model_counts(teacher, input_shape),
            "teacher_images_per_s": {k: float(np.median([r[f"teacher/{k}"] for r in per_round]))
                                     for k in ("fp32", "int8")},
            "rows": rows, "per_round": per_round}


def markdown(result: dict[str, Any], command: str, teacher_label: str) -> str:
    from edgepipe.reporting import formatting as fmt

    t = result["teacher_images_per_s"]
    lines = [
        "## Student shapes: INT8 throughput against the teacher (`make bench-shapes`)", "",
        f"Command: `{command}` — {result['date']}.",
        f"Host: {result['host']}, ISA flags {', '.join(result['isa']) or 'none of AVX2/AVX-512/AMX'}; "
        + ", ".join(f"{k} {v}" for k, v in result["libraries"].items() if k in ("openvino", "nncf", "torch")) + ".", "",
        (f"Each shape is a `cifar_resnet` (depth: stage widths) with random weights, quantized by NNCF (performance preset, "
        f"random calibration images: the graph OpenVINO compiles is the trained model's, its ranges are not); the "
        f"teacher ({teacher_label}, {fmt.count(result['teacher']['macs'])} MACs) as FP32 and as the same NNCF INT8. "
        f"OpenVINO CPU ({result['profile']} profile), {result['threads']} threads, batch {result['batch']}, input "
        f"{'x'.join(map(str, result['input_shape']))}, {result['warmup']} warm-up + {result['iterations']} timed runs "
        f"per model per round, all models in {result['rounds']} alternating rounds; a ratio is the median over rounds "
        f"of that round's images/s ratio. Teacher: {t['fp32']:,.0f} img/s FP32, {t['int8']:,.0f} img/s INT8 "
        f"(INT8 = {t['int8'] / t['fp32']:.2f}x FP32 on this host)."), "",
        "| shape (depth: widths) | params | MACs | INT8 images/s | x teacher-fp32 | x teacher-int8 |",
        "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {fmt.count(r['params'])} | {fmt.count(r['macs'])} | {r['images_per_s']:,.0f} | "
                     f"{r['x_teacher_fp32']:.2f}x | {r['x_teacher_int8']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from edgepipe.models.loading import ExportedProgramModel, load_program
    from edgepipe.profiles import get_profile
    from edgepipe.reporting.formatting import replace_section

    p = argparse.ArgumentParser(prog="python -m edgepipe.measure.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="the teacher as a torch.export program (.pt2)")
    p.add_argument("--shape", action="append", required=True, help="DEPTH:W1,W2,W3, e.g. 14:16,32,48 (repeat)")
    p.add_argument("--target", default="intel-xeon-amx", help="hardware profile (its OpenVINO CPU settings)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out", type=Path, help="write the student-shapes section into this Markdown file")
    p.add_argument("--json", type=Path, help="write the figures (every round) as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        shapes = [parse_shape(s) for s in args.shape]
        if not args.teacher.is_file():
            raise EdgepipeError(f"--teacher {args.teacher}: no such file; give the teacher's .pt2 program")
        teacher = ExportedProgramModel(load_program(args.teacher).module())
        profile = get_profile(args.target)
        result = measure_shapes(teacher, shapes, profile, num_classes=args.num_classes, batch=args.batch,
                                rounds=args.rounds, warmup=args.warmup, iterations=args.iterations,
                                threads=args.threads,
                                progress=lambda what, i, n, _: log.info("%s %d/%d", what, i, n))
    except EdgepipeError as e:
        print(f"error: {e}")
        return 2
    command = "python -m edgepipe.measure.shapes " + " ".join(
        [f"--teacher {args.teacher}", *(f"--shape {s}" for s in args.shape), f"--target {args.target}"])
    text = markdown(result, command, args.teacher.name)
    print(text)
    if args.json:
        from edgepipe.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1))
    if args.out:
        replace_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
