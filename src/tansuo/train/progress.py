"""The training progress bar (Rich): step, loss, throughput, best metric and ETA, on rank 0 only."""

from __future__ import annotations


class ProgressBar:
    """A Rich progress bar with step, loss, throughput and ETA; a no-op when disabled."""

    def __init__(self, total: int, unit: str, enabled: bool) -> None:
        self.enabled, self.unit, self.total = enabled, unit, total
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]}"),
                TextColumn("{task.fields[best]}"),
                TimeRemainingColumn(),
            )
            self.id = self.bar.add_task("train", total=total, loss="-", speed="", best="")

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def best(self, text: str) -> None:
        if self.enabled:
            self.bar.update(self.id, best=text)

    def update(self, step: int, stats: dict[str, float] | None) -> None:
        if not self.enabled:
            return
        fields = {}
        if stats:
            fields = {
                "loss": f"{stats['loss']:.4f}",
                "speed": f"{stats[f'{self.unit}_per_s']:,.0f} {self.unit}/s",
            }
        self.bar.update(self.id, completed=step, **fields)
