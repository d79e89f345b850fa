"""The ``scnas`` command line: thin commands that parse, call one library function and print."""

from scnas.cli.main import app, main

__all__ = ["app", "main"]
