"""Fitting the calibrated roofline (edgepipe.measure.roofline.CALIBRATED_FORM) to published results.

The rows of ``hardware_profiles/published/jetson.yaml`` marked ``use: fit`` give, per device family, the
factors the calibrated estimate applies; ``hardware_profiles/published/calibrate.py`` runs :func:`calibrate` and
writes them back into the table. :func:`row_estimate` sets one published row against its estimate.
"""
from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError
from edgepipe.measure.layers import Layer, model_layers
from edgepipe.measure.roofline import (Calibration, calibrated_estimate, calibrated_latency_s, display_path,
                                       peak_tops_for, published_path, published_table)
from edgepipe.types import DType


DEFAULT_ENQUEUE_SHARE = 0.5
"""Share of the fitted overhead attributed to the per-inference enqueue/sync (the rest is per kernel) when the
published rows cannot separate the two (one kernel count): an assumption, not a fitted value."""


_METRIC_FIELD = {"latency_p90_ms": "latency_ms", "latency_p99_ms": "latency_ms", "latency_ms": "latency_ms",
                 "samples_per_s": "images_per_s"}


def row_estimate(row: dict[str, Any], calibration: Calibration, layers: list[Layer] | None = None) -> dict[str, Any]:
    """One published row against the calibrated estimate of the same network, device, dtype and batch:
    ``published``, ``estimate`` (same unit), ``ratio`` (estimate / published) and the full ``result``."""
    from edgepipe.profiles import get_profile

    layers = layers or _row_layers(row)
    result = calibrated_estimate(get_profile(row["device"]), DType(row["dtype"]), layers, int(row["batch"]),
                                 calibration)
    field = _METRIC_FIELD.get(row["metric"])
    if field is None:
        raise EdgepipeError(f"published row '{row.get('id')}': unknown metric '{row['metric']}' "
                            f"(known: {', '.join(_METRIC_FIELD)})")
    return {"id": row["id"], "device": row["device"], "scenario": row.get("scenario"), "metric": row["metric"],
            "batch": int(row["batch"]), "use": row.get("use"), "published": float(row["value"]),
            "estimate": result[field], "ratio": result[field] / float(row["value"]), "result": result}


@cache
def _arch_layers(arch: str, kwargs_items: tuple, input_shape: tuple[int, ...]) -> tuple[Layer, ...]:
    from edgepipe.models.zoo import build_arch

    return tuple(model_layers(build_arch(arch, dict(kwargs_items)), input_shape))


def _row_layers(row: dict[str, Any]) -> list[Layer]:
    kwargs = tuple(sorted((row.get("arch_kwargs") or {}).items()))
    return list(_arch_layers(row["arch"], kwargs, tuple(row["input_shape"])))


def calibrate(path: Path | None = None, enqueue_share: float = DEFAULT_ENQUEUE_SHARE) -> dict[str, dict[str, Any]]:
    """Fit every family's factors to its published rows marked ``use: fit`` (:data:`CALIBRATED_FORM`).

    Least squares on log(estimate / published) over the rows (scipy's ``least_squares``, bounded: efficiencies
    in [0.01, 1], overheads >= 0). Rows of one kernel count fit the compute efficiency, the bandwidth efficiency
    and the total overhead, split by ``enqueue_share``; rows of several kernel counts fit both overheads.

    Returns:
        Per family: the fitted values in the table's ``calibration`` form, plus ``rows`` (each fitted row
        against its estimate, see :func:`row_estimate`) and ``checks`` (the family's other rows, not fitted).
    """
    import numpy as np
    from scipy.optimize import least_squares

    from edgepipe.profiles import get_profile

    data = published_table(path)
    out: dict[str, dict[str, Any]] = {}
    for family, spec in (data.get("families") or {}).items():
        members = list(spec.get("profiles") or [])
        rows = [r for r in data["results"] if r.get("device") in members and r.get("use") == "fit"]
        if not rows:
            continue
        cases = []
        for r in rows:
            prof = get_profile(r["device"])
            dtype = DType(r["dtype"])
            field = _METRIC_FIELD[r["metric"]]
            cases.append((_row_layers(r), dtype, int(r["batch"]), peak_tops_for(prof, dtype),
                          prof.memory_bandwidth_gbps, field, float(r["value"])))
        split = len({len(c[0]) for c in cases}) == 1

        def residuals(x: np.ndarray) -> list[float]:
            ec, eb = x[0], x[1]
            res = []
            for layers, dtype, batch, peak, bw, field, value in cases:
                if split:
                    kernel_s, enqueue_s = x[2] * (1 - enqueue_share) / len(layers), x[2] * enqueue_share
                else:
                    kernel_s, enqueue_s = x[3], x[2]
                t = calibrated_latency_s(layers, dtype, batch, peak, bw, ec, eb, kernel_s, enqueue_s)[0]
                est = t * 1e3 if field == "latency_ms" else batch / t
                res.append(math.log(est / value))
            return res

        x0 = [0.5, 0.5, 1e-4] if split else [0.5, 0.5, 5e-5, 2e-6]
        hi = [1.0, 1.0, 1e-2] if split else [1.0, 1.0, 1e-2, 1e-3]
        fit = least_squares(residuals, x0, bounds=([0.01, 0.01] + [0.0] * (len(x0) - 2), hi), xtol=1e-12,
                            ftol=1e-12)
        if split:
            kernels = len(cases[0][0])
            kernel_us = fit.x[2] * (1 - enqueue_share) / kernels * 1e6
            enqueue_us = fit.x[2] * enqueue_share * 1e6
        else:
            kernel_us, enqueue_us = fit.x[3] * 1e6, fit.x[2] * 1e6
        result = {
            "profiles": members,
            "compute_efficiency": round(float(fit.x[0]), 4),
            "bandwidth_efficiency": round(float(fit.x[1]), 4),
            "kernel_launch_us": round(float(kernel_us), 3),
            "enqueue_us": round(float(enqueue_us), 2),
            "enqueue_share": enqueue_share if split else None,
            "fitted_on": [r["id"] for r in rows],
            "fitted_devices": sorted({r["device"] for r in rows}, key=members.index),
            "fitted_dtypes": sorted({r["dtype"] for r in rows}),
        }
        cal = Calibration(family=family, profiles=tuple(members), compute_efficiency=result["compute_efficiency"],
                          bandwidth_efficiency=result["bandwidth_efficiency"],
                          kernel_launch_us=result["kernel_launch_us"], enqueue_us=result["enqueue_us"],
                          enqueue_share=result["enqueue_share"],
                          fitted_on=tuple(result["fitted_on"]), fitted_devices=tuple(result["fitted_devices"]),
                          fitted_dtypes=tuple(result["fitted_dtypes"]), max_fit_error=1.0,
                          source=str(data.get("source_round", "")),
                          table=display_path(Path(path or published_path())))
        checked = [row_estimate(r, cal) for r in rows]
        result["max_fit_error"] = round(max(max(c["ratio"], 1 / c["ratio"]) for c in checked), 4)
        others = [row_estimate(r, cal) for r in data["results"] if r.get("device") in members and r.get("use") != "fit"]
        out[family] = {**result, "rows": [{k: v for k, v in c.items() if k != "result"} for c in checked],
                       "checks": [{k: v for k, v in c.items() if k != "result"} for c in others]}
    return out
