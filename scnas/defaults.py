"""Defaults that the library's settings (``BuildConfig``, ``TrainConfig``, ``SearchConfig``,
``predict_folder``) and the command line share, written once. Torch-free, so that the CLI
can show them in ``--help`` without importing torch; the config models take their defaults
from here and the CLI options from here, so the two cannot drift apart. The same holds for
the choices a setting accepts (the ``*_CHOICES`` tuples at the end): the settings' ``Literal``
types, the library's checks and the CLI's options are made from these very tuples."""

from __future__ import annotations

# Network (BuildConfig)
STEM_TRAIN = 68            # paper: 68 channels for retraining (also BuildConfig's default)
STEM_SEARCH = 48           # paper: 48 during search
IN_CHANNELS = 4            # BraTS: 4 MRI sequences
NUM_CLASSES = 3
DEPTH = 3                  # down-samplings
UPSAMPLING = "trilinear"
DEEP_SUPERVISION = False   # nnU-Net trains with it; the paper does not mention it

# Both loops
PATCH = (128, 128, 128)
STEPS_PER_EPOCH = 250
SEED = 0
FOLD = 0
DEVICE = "auto"            # CUDA when available
AMP = "auto"               # fp16 on CUDA, off on the CPU
WORKERS = "auto"
LOSS = "jaccard"

# Training (TrainConfig)
TRAIN_BATCH_SIZE = 8       # paper: 8
TRAIN_EPOCHS = 500         # paper: at most 500
TRAIN_LR = 3e-4            # paper: Adam 3e-4

# Search (SearchConfig)
SEARCH_BATCH_SIZE = 1      # the paper: 4, one on each of 4 GPUs
SEARCH_EPOCHS = 200
NODES = 4
SAMPLING = "pair"
TAU_MAX = 10.0
TAU_MIN = 0.1
TAU_SCHEDULE = "linear"
ALPHA_LR = 0.003           # paper: 0.003
DERIVE = "top-k"
TOP_K = 2
DERIVE_BY = "alpha"            # what derivation ranks: softmax(alpha), or the perturbation scores
PERTURBATION_PATCHES = 8   # architecture-set patches the perturbation scores are measured on

# Data preparation (PrepareSettings)
SPACING = (0.7, 0.7, 0.7)   # mm; paper: 0.7 isotropic
LAYOUT = "msd"              # of synthetic task folders (phantoms, planted)
IMAGE_DTYPE = "float16"     # half the bytes of float32

# Prediction (predict_folder)
BACKEND = "torch"

# Export (export_onnx)
ONNX_PROVIDER = "cpu"       # where the exported graph is checked against PyTorch
OVERLAP = 0.5              # paper: 0.5
PREDICT_BATCH_SIZE = 2     # windows per forward pass

# Choices: every set of accepted values, written once (tests/test_api.py lists who uses each)
PRECISIONS = ("off", "fp16", "bf16")                  # what a step runs in
AMP_CHOICES = ("auto", *PRECISIONS)                   # auto: fp16 on CUDA, off on the CPU
CHECKPOINT_MODES = ("off", "cells", "edges")
"""Activation checkpointing: ``off`` keeps every activation for backward; ``cells`` keeps only
the cell boundaries and recomputes one cell at a time during backward; ``edges`` also
recomputes each edge inside the recomputed cell (least memory, one more forward)."""
CHECKPOINT_CHOICES = ("auto", *CHECKPOINT_MODES)      # auto: the cheapest mode that fits the budget
DEVICE_CHOICES = ("auto", "cpu", "cuda")              # auto: CUDA when available
LOSS_CHOICES = ("jaccard", "jaccard-fg")              # -fg: foreground classes only
UPSAMPLING_CHOICES = ("trilinear", "transposed")
SAMPLING_CHOICES = ("pair", "one", "full")            # Algorithm 1, GDAS-like, DARTS
TAU_SCHEDULE_CHOICES = ("linear", "exponential")
DERIVE_CHOICES = ("top-k", "argmax")
DERIVE_BY_CHOICES = ("alpha", "perturbation")         # scnas derive --by (DARTS-PT: scnas.search.perturb)
IMAGE_DTYPE_CHOICES = ("float16", "float32")          # how a prepared cache stores images
LAYOUT_CHOICES = ("msd", "nnunetv2")                  # synthetic task folders: 4D images, or a file per channel
BACKEND_CHOICES = ("torch", "onnxruntime")            # what runs a model file for prediction
ONNX_PROVIDER_CHOICES = ("cpu", "cuda", "tensorrt")   # onnxruntime execution providers an export is checked on
