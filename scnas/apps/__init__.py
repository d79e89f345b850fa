"""Applications: whole workflows on top of the library. ``memory_report`` (``scnas plan``),
``demo`` (``scnas demo``) and ``cv`` (``scnas cv``: cross-validation studies, which search and
retrain, so they sit above both). Only the command line and ``scnas``'s lazy exports import them."""
