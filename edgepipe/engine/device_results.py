"""Measured figures from the device, merged back into the run that made its deploy bundle.

A TensorRT bundle's device script (``edgepipe_trt.py run``, edgepipe.backends.tensorrt_device) writes
``results.json`` on the Jetson. ``edgepipe import-results --run RUN results.json`` checks it against the run
(schema, target, and the sha256 of the ONNX the engine was built from, which must be the run's compiled
ONNX) and stores it as ``RUN/device/<target>.json``; the report shows it beside the roofline estimate.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgepipe.reporting import formatting as fmt
from edgepipe.backends.tensorrt_device import SCHEMA, sha256
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write_json
from edgepipe.profiles import all_profiles
from edgepipe.types import ArtifactKind

DEVICE_DIR = "device"
_TIMING_KEYS = ("batch", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "warmup", "iterations")


def load_results(path: Path) -> dict[str, Any]:
    """Read and check a device results JSON; one clear line for anything wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgepipeError(f"{path}: not found; it is written on the device by `python3 edgepipe_trt.py run`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgepipeError(f"{path}: not valid JSON ({e}); copy results.json from the device again") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise EdgepipeError(f"{path}: schema is {found!r}, expected {SCHEMA!r}; write it with the bundle's "
                            "edgepipe_trt.py")
    for section in ("latency", "throughput"):
        rec = data.get(section)
        if not isinstance(rec, dict):
            raise EdgepipeError(f"{path}: {section} is missing; rerun edgepipe_trt.py bench")
        for key in _TIMING_KEYS:  # a figure the report shows as measured on the device: finite, not negative
            _check_number(path, f"{section}.{key}", rec.get(key), whole=key in _COUNTS, least=_LEAST.get(key, 0))
        for key in _OPTIONAL_FIGURES:
            if key in rec:
                _check_number(path, f"{section}.{key}", rec[key])
    for key in ("tensorrt_version", "target"):
        if not isinstance(data.get(key), str):
            raise EdgepipeError(f"{path}: '{key}' is missing; rerun edgepipe_trt.py bench with this bundle")
    if not isinstance((data.get("engine") or {}).get("onnx_sha256"), str):
        raise EdgepipeError(f"{path}: engine.onnx_sha256 is missing; rerun edgepipe_trt.py bench with this bundle")
    acc = data.get("accuracy")
    if isinstance(acc, dict) and "detections" in acc:
        _check_detections(path, acc)
    elif acc is not None and not (isinstance(acc, dict) and _is_number(acc.get("top1")) and 0 <= acc["top1"] <= 1):
        raise EdgepipeError(f"{path}: accuracy.top1 must be a fraction in [0, 1]; rerun edgepipe_trt.py bench")
    if acc is not None and "images" in acc:
        _check_number(path, "accuracy.images", acc["images"], whole=True, least=1)
    return data


def _check_detections(path: Path, acc: dict[str, Any]) -> None:
    """A detector's device detections: per image, boxes [[x1, y1, x2, y2]], scores and labels of one length, all
    finite numbers (the host scores them; a damaged file must not score)."""
    found = acc["detections"]
    lists = [found.get(k) if isinstance(found, dict) else None for k in ("boxes", "scores", "labels")]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1 \
            or len(lists[0]) != acc.get("images"):
        raise EdgepipeError(f"{path}: accuracy.detections must hold boxes, scores and labels for each of the "
                            f"{acc.get('images')} images; copy results.json from the device again")
    for i, (boxes, scores, labels) in enumerate(zip(*lists)):
        ok = (isinstance(boxes, list) and isinstance(scores, list) and isinstance(labels, list)
              and len(boxes) == len(scores) == len(labels)
              and all(isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b) for b in boxes)
              and all(_is_number(s) for s in scores) and all(isinstance(v, int) and v >= 0 for v in labels))
        if not ok:
            raise EdgepipeError(f"{path}: accuracy.detections of image {i} are damaged (boxes of 4 finite numbers, "
                                "scores and class indices of one length); copy results.json from the device again")


def score_detections(acc: dict[str, Any], val_path: Path) -> dict[str, Any]:
    """The device's detections scored as every stage is (the detection task's COCO metrics, pycocotools) against
    the bundle's ground truth (its ``val.npz``)."""
    import numpy as np

    from edgepipe.backends.tensorrt_plan import detection_validation_targets
    from edgepipe.tasks import get_task

    with np.load(val_path, allow_pickle=False) as val:
        truth = detection_validation_targets(val)
        names = [str(n) for n in val["class_names"]]
    found = acc["detections"]
    if len(truth) != len(found["boxes"]):
        raise EdgepipeError(f"{val_path}: {len(truth)} images, the device scored {len(found['boxes'])}; the results "
                            "are not from this bundle")
    k = max(1, max(len(s) for s in found["scores"]))
    n = len(truth)
    outputs = {"boxes": np.zeros((n, k, 4), np.float32), "scores": np.zeros((n, k), np.float32),
               "labels": np.full((n, k), -1, np.int64), "count": np.zeros(n, np.int64)}
    for i, (b, s, lab) in enumerate(zip(found["boxes"], found["scores"], found["labels"])):
        c = len(s)
        outputs["boxes"][i, :c], outputs["scores"][i, :c], outputs["labels"][i, :c] = \
            np.asarray(b, np.float32).reshape(-1, 4), s, lab
        outputs["count"][i] = c
    scores = get_task("detection").metrics(outputs, [truth], names)
    return {k: scores.get(k) for k in ("map50", "map", "map75", "per_class")}


_COUNTS = ("batch", "warmup", "iterations")
_LEAST = {"batch": 1, "iterations": 1}
_OPTIONAL_FIGURES = ("mean_ms", "end_to_end_p50_ms")


def _is_number(value: Any) -> bool:
    """A finite JSON number; ``true``/``false`` are not numbers (Python's bool is an int), nor are NaN and
    Infinity, which Python's json module reads although JSON has no such literals."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(path: Path, field: str, value: Any, whole: bool = False, least: int = 0) -> None:
    if _is_number(value) and value >= least and (not whole or isinstance(value, int)):
        return
    found = "missing" if value is None else json.dumps(value)[:40]  # as the file spells it: NaN, true, -1
    what = "a whole number" if whole else "a finite number"
    raise EdgepipeError(f"{path}: {field} is {found}, expected {what} >= {least}; the file is damaged or not from "
                        "edgepipe_trt.py: copy results.json from the device again, or rerun edgepipe_trt.py bench")


def import_results(run_dir: Path, path: Path) -> Path:
    """Store checked device results in ``run_dir/device/<target>.json``; returns that path.

    Raises:
        EdgepipeError: the file is not valid results, the run has no TensorRT bundle for that target, or the
            engine was built from another ONNX than the run's (a stale bundle).
    """
    run_dir = Path(run_dir)
    data = load_results(path)
    bundle = run_dir / "compile"
    artifact_file = bundle / "artifact.json"
    try:
        artifact = json.loads(artifact_file.read_bytes())
        if not isinstance(artifact, dict):
            raise ValueError("not an object")
    except (FileNotFoundError, ValueError):
        raise EdgepipeError(f"{artifact_file}: no compiled artifact; run `edgepipe run --run {run_dir}` for the "
                            "TensorRT target first") from None
    meta = artifact.get("meta") if isinstance(artifact.get("meta"), dict) else {}
    run_target = _run_target(run_dir)
    built_for = meta.get("target") or run_target
    if data["target"] not in {*all_profiles(), run_target} or Path(data["target"]).name != data["target"]:
        raise EdgepipeError(f"{path}: target {data['target'][:80]!r} is not a known hardware profile (`edgepipe "
                            "profiles` lists them); copy results.json from the device again")
    if artifact.get("kind") != ArtifactKind.TENSORRT_BUNDLE.value:
        other = run_dir / "targets" / data["target"]
        hint = f" ({other} has one)" if (other / "compile" / "artifact.json").is_file() else ""
        raise EdgepipeError(f"{run_dir} has no TensorRT deploy bundle: its compile stage built "
                            f"{str(artifact.get('kind'))[:40]!r} for target {built_for}; import {path} into the run "
                            f"that made the bundle{hint}")
    if built_for != data["target"]:
        raise EdgepipeError(f"{path}: results are for target {data['target']!r}, but the deploy bundle of {run_dir} "
                            f"was built for {built_for!r}; import them into the run that made that bundle")
    onnx = bundle / "model.onnx"
    if onnx.is_file() and sha256(onnx) != data["engine"]["onnx_sha256"]:
        raise EdgepipeError(f"{path}: the engine was built from another ONNX than {onnx} (sha256 differs): the "
                            "bundle is stale; copy this run's compile/ folder to the device and run it again")
    acc = data.get("accuracy")
    if isinstance(acc, dict) and "detections" in acc:  # a detector: scored here, as every stage is
        val = bundle / "val.npz"
        if not val.is_file():
            raise EdgepipeError(f"{val}: missing; the device's detections are scored against the bundle's ground "
                                "truth: recompile the run (edgepipe run --run RUN --force compile)")
        data["accuracy"] = {**acc, **score_detections(acc, val),
                            "scored": "on the host at import: pycocotools COCOeval, as every stage"}
    out = run_dir / DEVICE_DIR / f"{data['target']}.json"
    atomic_write_json(out, {**data, "imported_from": str(Path(path).resolve())})
    return out


def _run_target(run_dir: Path) -> str | None:
    """The target in the run's manifest.json (None when it cannot be read: the bundle's own record decides)."""
    try:
        target = json.loads((run_dir / "manifest.json").read_bytes()).get("target")
    except (OSError, ValueError, AttributeError):
        return None
    return target if isinstance(target, str) else None


def _metric_row(acc: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The device's headline figure on the bundle's images beside the exported ONNX's on the same images: top-1 for
    a classifier, mAP@.5 (scored at import) for a detector."""
    metric, label = ("map50", "mAP@.5") if "map50" in acc or "detections" in acc else ("top1", "top-1")
    value, ref = acc.get(metric), reference.get(f"reference_{metric}")
    what = "sentences" if "sentences" in acc else "images"
    return [f"{label} on {acc.get(what, '?')} bundle {what}",
            f"{100 * value:.2f}%" if _is_number(value) else fmt.DASH,
            f"reference (exported ONNX, ONNX Runtime): {100 * ref:.2f}%" if _is_number(ref) else fmt.DASH]


def device_blocks(run_dir: Path, rows: list[dict[str, Any]]) -> list[tuple]:
    """Report blocks: each imported device result beside the compile stage's estimate for that target."""
    folder = Path(run_dir) / DEVICE_DIR
    results = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            results.append(load_results(f))
        except EdgepipeError as e:
            results.append({"error": str(e)})
    if not results:
        return []
    compiled = next((r for r in rows if r["stage"] == "compile"), None)
    est = (compiled or {}).get("estimate") or {}
    try:
        metrics = json.loads((Path(run_dir) / "compile" / "metrics.json").read_text())
        reference = ((metrics.get("records") or {}).get("device_validation") or {})
    except (FileNotFoundError, ValueError, AttributeError):
        reference = {}
    blocks: list[tuple] = [("h2", "Measured on the device")]
    for res in results:
        if "error" in res:
            blocks.append(("list", [res["error"]]))
            continue
        lat, thr, acc = res["latency"], res["throughput"], res.get("accuracy") or {}
        est1 = (est.get("batch_1") or est) if isinstance(est, dict) else {}
        estb = est.get(f"batch_{thr['batch']}") if isinstance(est, dict) else None
        head = ["figure", "measured on the device", "estimate (not measured)"]
        rows_ = [
            [f"latency p50 / p90 / p99, batch {lat['batch']}",
             f"{fmt.ms(lat['p50_ms'])} / {fmt.ms(lat['p90_ms'])} / {fmt.ms(lat['p99_ms'])} ms",
             f"{fmt.ms(est1['latency_ms'])} ms" if isinstance(est1, dict) and est1.get("latency_ms") else fmt.DASH],
            [f"throughput, batch {thr['batch']}", f"{thr['images_per_s']:,.0f} img/s",
             f"{estb['images_per_s']:,.0f} img/s" if isinstance(estb, dict) and estb.get("images_per_s") else fmt.DASH],
            _metric_row(acc, reference),
        ]
        counts = ", ".join(f"{k} {v}" for k, v in sorted((res.get("precision_counts") or {}).items()))
        blocks += [
            ("h3", f"{res['target']}: {res.get('gpu', 'GPU')}"),
            ("kv", [("TensorRT", res["tensorrt_version"]), ("L4T / JetPack", f"{res.get('l4t', fmt.DASH)} / "
                                                                           f"{res.get('jetpack', fmt.DASH)}"),
                    ("Engine precision (compute layers)", res.get("precision") or fmt.DASH),
                    ("Layers by precision", counts or fmt.DASH),
                    ("Timing", f"{lat.get('timer', 'CUDA events')}; {lat['warmup']} warm-up + {lat['iterations']} "
                               f"timed runs; end-to-end p50 with host copies {fmt.ms(lat.get('end_to_end_p50_ms'))} ms"),
                    ("Measured", res.get("created", fmt.DASH))]),
            ("table", head, rows_),
        ]
    return blocks
