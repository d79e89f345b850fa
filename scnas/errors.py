"""The small hierarchy of errors scnas raises for bad input.

Every error a user can cause is a ``ScnasError``; the command line turns it into one line
per problem and a non-zero exit, without a traceback (unless ``--debug``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (a field path such as
    ``cells.reduction.edges[3].op``, empty for the whole document) and what."""

    path: str
    message: str

    def render(self, source: str | None) -> str:
        parts = [p for p in (source, self.path) if p]
        return ": ".join(parts + [self.message])


class ScnasError(Exception):
    """Base class: an input or request scnas cannot honour, described for the user.

    Args:
        message: what is wrong (one problem without a field path).
        source: the file (or input) it is about.
        problems: several problems, each with its field path (instead of ``message``).
    """

    def __init__(self, message: str | None = None, *, source: str | None = None,
                 problems: list[Problem] | None = None):
        if problems is None:
            problems = [Problem("", message or "unknown error")]
        self.source = source
        self.problems = list(problems)
        super().__init__(str(self))

    def lines(self) -> list[str]:
        """One line per problem, each naming the source (file) and field path."""
        return [p.render(self.source) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def with_source(self, source: str) -> "ScnasError":
        """The same error, attributed to ``source`` (a file name) when it had none."""
        if self.source is None:
            self.source = source
            self.args = (str(self),)
        return self


class GenotypeError(ScnasError):
    """A genotype document that cannot be read, is malformed, or describes no valid cells."""


class OutputError(ScnasError):
    """An output file that cannot be written (missing folder, no permission, ...)."""


class DamagedFileError(ScnasError):
    """A file scnas wrote itself (a cache's arrays and records, a run's config.json or checkpoint,
    a study's files) that is missing, truncated, garbled or of the wrong shape: raised only by
    ``scnas.records``, naming the file, what is wrong with it and how to get a good one."""


def spoken(choices) -> str:
    """``('a', 'b', 'c')`` as ``a, b or c``."""
    choices = [str(choice) for choice in choices]
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def check_choice(value, choices: tuple, what: str, *, error: type[ScnasError] = ScnasError):
    """``value`` when it is one of ``choices`` (a tuple of :mod:`scnas.defaults`); otherwise
    ``error``: "WHAT must be a, b or c, not 'value'".

    Args:
        value: the value given.
        choices: the tuple of :mod:`scnas.defaults` it must be one of.
        what: how the message names the setting (``--amp``).
        error: the error to raise.
    """
    if value not in choices:
        raise error(f"{what} must be {spoken(choices)}, not {value!r}")
    return value
