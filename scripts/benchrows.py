"""The rows `make bench` prints, shared by scripts/bench.py and scripts/bench_search.py.

A `Row` is a label and its `Measure`s; it prints as
`label: 1.23 s (target <= 3 s, ratio 0.41) | peak RSS 612 MB (target <= 1024 MB, ratio 0.60)`
and says `<-- TARGET MISSED` when a measure is over its target.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Measure:
    """One figure; `target` is an upper bound, None for a reference figure."""

    name: str  # "" for the row's main figure (a time)
    value: float
    unit: str
    target: float | None = None
    note: str = ""
    digits: int | None = None  # decimals shown; None: 2 for seconds, else 0

    @property
    def met(self) -> bool:
        return self.target is None or self.value <= self.target

    def __str__(self) -> str:
        digits = self.digits if self.digits is not None else 2 if self.unit == "s" else 0
        text = f"{self.name} {self.value:.{digits}f} {self.unit}".strip()
        notes = [self.note] if self.note else []
        if self.target is not None and not self.unit:  # the figure is itself a ratio
            notes.insert(0, f"target <= {self.target:g}")
        elif self.target is not None:
            notes.insert(
                0, f"target <= {self.target:g} {self.unit}, ratio {self.value / self.target:.2f}"
            )
        return text + (f" ({'; '.join(notes)})" if notes else "")


@dataclass
class Row:
    label: str
    measures: list[Measure] = field(default_factory=list)
    separator: str = " | "

    @property
    def met(self) -> bool:
        return all(measure.met for measure in self.measures)

    def __str__(self) -> str:
        if not self.measures:  # a heading, e.g. the device
            return self.label
        text = f"{self.label}: " + self.separator.join(map(str, self.measures))
        return text if self.met else text + "  <-- TARGET MISSED"
