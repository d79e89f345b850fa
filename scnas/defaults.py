"""Defaults that the library's settings (``BuildConfig``, ``TrainConfig``, ``SearchConfig``,
``predict_folder``) and the command line share, written once. Torch-free, so that the CLI
can show them in ``--help`` without importing torch; the config models take their defaults
from here and the CLI options from here, so the two cannot drift apart."""

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

# Prediction (predict_folder)
OVERLAP = 0.5              # paper: 0.5
PREDICT_BATCH_SIZE = 2     # windows per forward pass
