"""scnas: neural architecture search for 3D medical image segmentation (SCNAS, MICCAI 2019),
built around an exchangeable, versioned genotype format.

The doors of each stage are importable from here (``from scnas import run_search``); each is
imported on first use, so that ``import scnas`` (and the genotype tools) never import torch."""

__version__ = "0.1.0"

_EXPORTS = {   # name: the module it lives in
    # the genotype format (torch-free)
    "Genotype": "scnas.genotype", "builtin_genotype": "scnas.genotype", "genotype_hash": "scnas.genotype",
    "load_genotype": "scnas.genotype", "read_genotype": "scnas.genotype", "write_genotype": "scnas.genotype",
    # networks and model files
    "BuildConfig": "scnas.build", "build_network": "scnas.build", "load_model": "scnas.build",
    "save_model": "scnas.build", "network_stats": "scnas.build",
    # data
    "prepare_dataset": "scnas.data", "write_phantom_dataset": "scnas.data",
    # search
    "SearchConfig": "scnas.search", "run_search": "scnas.search", "derive_genotype": "scnas.search",
    # retraining, prediction, evaluation
    "TrainConfig": "scnas.train", "run_training": "scnas.train", "load_predictor": "scnas.train",
    "predict_folder": "scnas.train", "evaluate_folders": "scnas.train",
    # cross-validation studies
    "CVError": "scnas.apps.cv", "plan_study": "scnas.apps.cv", "run_study": "scnas.apps.cv",
    "write_report": "scnas.apps.cv",
    # export
    "export_onnx": "scnas.export",
    # errors
    "ScnasError": "scnas.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    # Lazy: the module holding ``name`` is imported on first use, then the name is kept here.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scnas' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
