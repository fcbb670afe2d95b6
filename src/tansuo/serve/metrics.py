"""Counters and histograms for ``GET /metrics``, in the Prometheus text exposition format (version 0.0.4).

Small on purpose: the server needs a handful of series, updated from the event loop and the worker thread
under one lock, and no client library.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = list(labels) + ([extra] if extra else [])
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped, strict=True)) + "}"


def _number(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    """The server's series: counters (``inc``) and histograms (``observe``), each with optional labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)  # bucket counts, then sum, count
        self._buckets: dict[str, tuple[float, ...]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help)
        self._buckets[name] = tuple(sorted(buckets))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self._buckets[name]
        with self._lock:
            row = self._hist[name].setdefault(key, [0.0] * (len(buckets) + 2))
            for i, bound in enumerate(buckets):
                if value <= bound:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's value, or a histogram's observation count (for tests and the model card)."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._buckets:
                row = self._hist[name].get(key)
                return 0.0 if row is None else row[-1]
            return self._counters[name].get(key, 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                shown = help.replace("\\", "\\\\").replace("\n", "\\n")  # the exposition format's escapes
                lines += [f"# HELP {name} {shown}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for key, v in sorted(self._counters[name].items()):
                        lines.append(f"{name}{_labels(key)} {_number(v)}")
                    continue
                for key, row in sorted(self._hist[name].items()):
                    for bound, count in zip(
                        (*self._buckets[name], math.inf), (*row[:-2], row[-1]), strict=True
                    ):
                        lines.append(f"{name}_bucket{_labels(key, ('le', _number(bound)))} {_number(count)}")
                    lines.append(f"{name}_sum{_labels(key)} {_number(row[-2])}")
                    lines.append(f"{name}_count{_labels(key)} {_number(row[-1])}")
        return "\n".join(lines) + "\n"
