"""``python -m scnas``: the same as the ``scnas`` command (handy under torchrun)."""

from scnas.cli.main import run

run()
