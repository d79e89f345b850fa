"""Bridges to the frameworks scnas users already train with (nnU-Net v2). Nothing here is
imported by ``import scnas``; each module imports its framework only when a function needs it."""
