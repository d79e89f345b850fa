"""The run engine that search and training share: the settings, the run loop (``RunLoop``),
one optimiser step, checkpoints, torchrun's processes, ``torch.compile``. It sits above
``build`` and ``data`` and below ``search`` and ``train``; importing the package imports
nothing else (``settings`` stays torch-free)."""
