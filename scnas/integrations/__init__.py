"""Bridges to the frameworks where users already are (nnU-Net v2, MONAI bundles). Nothing here
is imported by ``import scnas``; each module imports its framework only when a function needs it."""
