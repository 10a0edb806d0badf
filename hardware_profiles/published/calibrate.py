"""Fit the calibrated estimate to the published results and show (or write) the fitted factors.

    .venv/bin/python hardware_profiles/published/calibrate.py           # fit, print, compare with the stored values
    .venv/bin/python hardware_profiles/published/calibrate.py --write   # also rewrite the calibration section

The table and the fitted ``calibration:`` section live in ``jetson.yaml`` beside this script; the model form and
how it is fitted are in ``edgepipe.measure.roofline.CALIBRATED_FORM`` and ``edgepipe.measure.calibrate.calibrate``.
The fit builds each row's network (torchvision ResNet-50) and counts its layers with one CPU forward pass: a few seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepipe.measure.calibrate import DEFAULT_ENQUEUE_SHARE, calibrate
from edgepipe.measure.roofline import published_table

TABLE = Path(__file__).with_name("jetson.yaml")
KEYS = ("compute_efficiency", "bandwidth_efficiency", "kernel_launch_us", "enqueue_us")


def render(fitted: dict[str, dict]) -> str:
    """The ``calibration:`` section: fitted values and, as comments, every fitted row against its estimate."""
    lines = ["calibration:"]
    for family, f in fitted.items():
        lines += [f"  {family}:", f"    profiles: [{', '.join(f['profiles'])}]"]
        for key in KEYS:
            lines.append(f"    {key}: {f[key]}")
        share = "null  # both overheads fitted" if f["enqueue_share"] is None else (
            f"{f['enqueue_share']}  # ASSUMPTION, not fitted: share of the fitted overhead paid once per inference")
        lines += [f"    enqueue_share: {share}",
                  f"    fitted_on: [{', '.join(f['fitted_on'])}]",
                  f"    fitted_devices: [{', '.join(f['fitted_devices'])}]",
                  f"    fitted_dtypes: [{', '.join(f['fitted_dtypes'])}]",
                  f"    max_fit_error: {f['max_fit_error']}  # largest factor between a fitted row and its estimate",
                  "    # row: published -> estimate (ratio estimate/published)"]
        for r in [*f["rows"], *f["checks"]]:
            unit = "ms" if r["metric"].startswith("latency") else "samples/s"
            lines.append(f"    #   {r['id']} (batch {r['batch']}): {r['published']} -> {r['estimate']:.4g} {unit} "
                         f"({r['ratio']:.3f}){'' if r['use'] == 'fit' else ', checked, not fitted'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the calibration section of jetson.yaml")
    ap.add_argument("--enqueue-share", type=float, default=DEFAULT_ENQUEUE_SHARE,
                    help="share of the fitted overhead paid once per inference (default %(default)s)")
    args = ap.parse_args(argv)
    fitted = calibrate(TABLE, enqueue_share=args.enqueue_share)
    section = render(fitted)
    print(section, end="")
    if args.write:
        text = TABLE.read_text()
        head = text[: text.index("\ncalibration:") + 1] if "\ncalibration:" in text else text
        TABLE.write_text(head + section)
        print(f"wrote {TABLE}")
        return 0
    stored = published_table(TABLE).get("calibration") or {}
    stale = [f"{fam}.{k}: stored {stored.get(fam, {}).get(k)}, fitted {f[k]}" for fam, f in fitted.items()
             for k in KEYS if stored.get(fam, {}).get(k) != f[k]]
    if stale:
        print("stored calibration differs from the fit (run with --write):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
