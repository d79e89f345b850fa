"""Applications that only the command line uses, each a whole workflow on top of the library:
``memory_report`` (``scnas plan``) and ``demo`` (``scnas demo``). Nothing in the library
imports them."""
