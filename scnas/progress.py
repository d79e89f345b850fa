"""A progress bar over the steps of an epoch (rich, on stderr, only on a terminal)."""

from __future__ import annotations


class StepBar:
    """A rich progress bar (stderr, terminals only) over ``total`` steps with a free info text."""

    def __init__(self, show: bool, total: int):
        self.show, self.total, self.bar = show, total, None

    def start(self, label: str, done: int = 0) -> None:
        if not self.show:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("steps", total=self.total, completed=done, info="")

    def advance(self, info: str = "", steps: int | None = None) -> None:
        """One step more, or ``steps`` done in all."""
        if self.bar is not None:
            if steps is None:
                self.bar.update(self.task, advance=1, info=info)
            else:
                self.bar.update(self.task, completed=steps, info=info)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
