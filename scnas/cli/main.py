"""Entry point of the ``scnas`` command: registers the commands on the app (``scnas.cli.app``)
and applies the error policy.

Errors a user can cause (``ScnasError``) print one line per problem on stderr and exit 1;
usage errors exit 2; anything else is a bug and says so. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import errno
import sys

from scnas.cli.app import app, stderr, stdout  # noqa: F401  (the app the command modules fill)
from scnas.errors import ScnasError


def _register_commands() -> None:
    # Each module adds its commands to ``app``; imported here so ``--help`` lists them all.
    from scnas.cli import (build_commands, cv_commands, data_commands, demo_commands,  # noqa: F401
                           export_commands, genotype_commands, nnunet_commands, plan_commands, search_commands,
                           search_report_commands, train_commands)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure/bad input, 2 usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _register_commands()
    try:
        # Standalone mode: typer reports usage errors itself and always ends in SystemExit.
        app(args=args, prog_name="scnas", obj={"help": any(a in ("-h", "--help") for a in args)})
    except SystemExit as exc:
        code = exc.code
        if code == 130 and _interrupted_by_user(exc):   # typer turns Ctrl-C into a silent exit 130
            stderr.out(interrupted_message(args))
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        stderr.out(interrupted_message(args))
        return 130
    except ScnasError as exc:
        if debug:
            raise
        for line in exc.lines():
            stderr.out(f"error: {line}")
        return 1
    except OSError as exc:
        if debug:
            raise
        if exc.errno not in ENVIRONMENT_ERRORS:
            return _internal_error(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        stderr.out(f"error: {where}{exc.strerror or exc} (the file system refused; nothing was written under a final "
                   "name)")
        return 1
    except Exception as exc:  # a bug, not bad input
        if debug:
            raise
        return _internal_error(exc)
    return 0


ENVIRONMENT_ERRORS = frozenset(getattr(errno, name) for name in (
    "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOTDIR", "EISDIR", "EEXIST", "ENOENT", "EIO", "EMFILE",
    "ENFILE", "ENAMETOOLONG", "ELOOP", "EXDEV", "ETXTBSY", "EBUSY", "ENXIO", "ESTALE") if hasattr(errno, name))
"""OSError numbers that mean the environment refused (permissions, a full or read-only disk, a
file in the way), not a bug: reported as an error (exit 1), not as a crash (exit 3)."""


def _internal_error(exc: BaseException) -> int:
    stderr.out(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, "
               "and please report it)")
    return 3


def _interrupted_by_user(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg[len(name) + 1:]
    return None


def interrupted_message(args: list[str]) -> str:
    """One line after Ctrl-C: what the interrupted command kept, and how to go on."""
    import shlex
    from pathlib import Path

    words = [a for a in args if not a.startswith("-")]
    command = words[0] if words else ""
    again = "scnas " + shlex.join(args)
    if command in ("search", "train"):
        out = _option(args, "-o", "--output")
        if out and (Path(out) / "checkpoint.pt").exists():
            resume = again if "--resume" in args else again + " --resume"
            return (f"interrupted: {out} keeps the run up to its last checkpoint ({Path(out) / 'checkpoint.pt'}); "
                    f"continue with: {resume}")
        return ("interrupted before the first checkpoint: nothing to resume (cases already prepared are kept in "
                f"the cache); start again with: {again}")
    if command == "cv":
        out = _option(args, "-o", "--output")
        if out and (Path(out) / "cv.json").exists():
            done = len(list(Path(out).glob("jobs/*/fold_*/evaluation.json")))
            searched = len(list(Path(out).glob("searches/fold_*/search.json")))   # with --search-per-fold
            return (f"interrupted: {out} keeps the study: {done} finished job(s) (their evaluation.json), "
                    + (f"{searched} finished search(es) (search.json), " if searched else "")
                    + "and the interrupted job resumes from its last checkpoint; continue with: "
                    f"scnas cv -o {shlex.quote(out)}" + (f" --shard {_option(args, '--shard')}"
                                                         if _option(args, "--shard") else ""))
        return f"interrupted before the study was planned: nothing to continue; start again with: {again}"
    if command == "data" and len(words) > 1 and words[1] == "prepare":
        return f"interrupted: the cases finished so far are kept in the cache; prepare the rest with: {again}"
    if command == "predict":
        out = _option(args, "-o", "--output")
        return f"interrupted: the segmentations finished so far are in {out}; predict again with: {again}"
    return "interrupted: no output was left half written (files are written whole or not at all)"


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
