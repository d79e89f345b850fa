"""scnas: neural architecture search for 3D medical image segmentation (SCNAS, MICCAI 2019),
built around an exchangeable, versioned genotype format."""

__version__ = "0.1.0"
