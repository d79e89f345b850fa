"""Entry point of the ``scnas`` command: the typer app and the error policy.

Errors a user can cause (``ScnasError``) print one line per problem on stderr and exit 1;
usage errors exit 2; anything else is a bug and says so. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from scnas import __version__
from scnas.errors import ScnasError

app = typer.Typer(
    name="scnas",
    help="Neural architecture search for 3D medical image segmentation (SCNAS, MICCAI 2019), "
         "built around a versioned genotype format.\n\n"
         "A GENOTYPE argument is a .yaml/.json/.darts/.oneline file, '-' for stdin, or a built-in "
         "name (see 'scnas genotype list').",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def settings_error(exc, error: type[ScnasError]) -> ScnasError:
    """A pydantic ValidationError of command settings as one ScnasError line per field."""
    return error("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()))


def _version(value: bool) -> None:
    if value:
        stdout.print(f"scnas {__version__}")
        raise typer.Exit(0)


COMPUTING = {"search", "train", "predict", "cv", "demo", "export-onnx"}   # where threads matter enough to say


@app.callback()
def _root(
    context: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when something fails."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="SCNAS_THREADS", min=1, metavar="N",
        help="CPU threads for torch in this process. Default: OMP_NUM_THREADS if set, else the usable cores less "
             "the load of other processes (a core taken by another job stalls all of torch's threads; "
             "loader workers use one each)."),
) -> None:
    """Root options; the commands do the work."""
    from scnas.threads import apply_threads

    chosen, why = apply_threads(threads)
    if "load" in why and context.invoked_subcommand in COMPUTING:   # fewer threads because of other jobs
        stderr.out(f"using {chosen} torch thread(s) ({why}); --threads N to choose")


def _register_commands() -> None:
    # Each module adds its commands to ``app``; imported here so ``--help`` lists them all.
    from scnas.cli import (build_commands, cv_commands, data_commands, demo_commands,  # noqa: F401
                           export_commands, genotype_commands, plan_commands, search_commands, train_commands)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure/bad input, 2 usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _register_commands()
    try:
        # Standalone mode: typer reports usage errors itself and always ends in SystemExit.
        app(args=args, prog_name="scnas")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        stderr.out("interrupted")
        return 130
    except ScnasError as exc:
        if debug:
            raise
        for line in exc.lines():
            stderr.out(f"error: {line}")
        return 1
    except Exception as exc:  # a bug, not bad input
        if debug:
            raise
        stderr.out(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, "
                   "and please report it)")
        return 3
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
