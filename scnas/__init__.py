"""scnas: neural architecture search for 3D medical image segmentation (SCNAS, MICCAI 2019),
built around an exchangeable, versioned genotype format."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that 'import scnas' (and the genotype tools) never import torch.
    if name in ("load_model", "build_network", "BuildConfig"):
        import scnas.build

        return getattr(scnas.build, name)
    raise AttributeError(f"module 'scnas' has no attribute {name!r}")
