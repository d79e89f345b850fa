"""Bridges to the frameworks where users already are (MONAI bundles, nnU-Net v2)."""
