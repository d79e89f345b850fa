"""From genotype to segmentation: retraining, sliding-window prediction, Dice evaluation."""

from scnas.train.evaluate import Evaluation, evaluate_folders, write_evaluation
from scnas.train.inference import gaussian_importance, sliding_window, window_starts
from scnas.train.predict import Predictor, find_cases, load_predictor, predict_case, predict_folder
from scnas.train.trainer import TrainConfig, TrainError, TrainResult, run_training

__all__ = ["Evaluation", "Predictor", "TrainConfig", "TrainError", "TrainResult", "evaluate_folders", "find_cases",
           "gaussian_importance", "load_predictor", "predict_case", "predict_folder", "run_training",
           "sliding_window", "window_starts", "write_evaluation"]
