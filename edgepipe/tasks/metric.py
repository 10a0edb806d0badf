"""A task's metrics as data: a name, how a value is shown, and which way is better (``Metric``); no dependencies, so
anything that compares models (the engine, quantization budgets, reports) can speak of a metric without a task."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """A score with its name, how it is shown, and which way is better.

    ``name`` is its key in records (``top1``); ``label`` its column title (``top-1``); a value is a fraction or a
    plain number, shown as ``value * scale`` in ``unit`` (top-1 0.9944 -> 99.44 %); a difference between two models
    is given in ``unit`` points (``points``). ``higher_is_better`` decides what "better", "a drop" and "a gain" mean
    in every comparison the engine makes (the gain check, ``qat.max_drop``, compile fidelity, compare, the report).
    """

    name: str
    label: str
    unit: str = "%"
    scale: float = 100.0
    higher_is_better: bool = True

    def shown(self, value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        return f"{value * self.scale:.2f}{' ' + self.unit if self.unit and self.unit != '%' else self.unit}"

    def gain_points(self, before: float, after: float) -> float:
        """How much better ``after`` is than ``before``, in display points (negative: worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return sign * (after - before) * self.scale

    def drop_points(self, reference: float, candidate: float) -> float:
        """How much worse ``candidate`` is than ``reference``, in display points (negative: better)."""
        return -self.gain_points(reference, candidate)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "unit": self.unit, "scale": self.scale,
                "higher_is_better": self.higher_is_better}

    @classmethod
    def from_record(cls, record: Any) -> Metric:
        """The metric a stage's metrics.json names (``metric``); top-1 for a run measured before tasks existed."""
        if isinstance(record, dict) and isinstance(record.get("name"), str):
            try:
                return cls(str(record["name"]), str(record.get("label") or record["name"]), str(record.get("unit", "")),
                           float(record.get("scale", 1.0)), bool(record.get("higher_is_better", True)))
            except (TypeError, ValueError):
                pass
        return TOP1


TOP1 = Metric("top1", "top-1")
"""Classification's headline: the metric of records that name none (runs made before tasks existed)."""
