"""Training: the loop (Trainer), checkpoints that resume exactly, metrics, and plots.

Reading order: metrics (what is measured), checkpoint (what is saved and how),
trainer (the loop that ties them to a model, an optimizer and data loaders), transfer (freezing
blocks, the second phase of fine-tuning), then what a run
leaves beside checkpoints: records (history and plots, written atomically by files), plots.
"""
from .checkpoint import (FORMAT_VERSION, CheckpointError, check_compatible, load_checkpoint, restore,
                         restore_rng_state, save_checkpoint)
from .metrics import (confusion_matrix, evaluate, per_class_accuracy, softmax, topk_accuracy,
                      topk_correct)
from .plots import GradFlowRecorder, gradient_norms, plot_confusion, plot_grad_flow, plot_history, plot_image_grid
from .trainer import NonFiniteLossError, Trainer, freeze_features, skip_input_grad
from .transfer import Unfreeze, conv_blocks, freeze_blocks, frozen_blocks

__all__ = ["Trainer", "NonFiniteLossError", "freeze_features", "skip_input_grad", "evaluate", "save_checkpoint",
           "load_checkpoint", "restore", "restore_rng_state", "check_compatible", "CheckpointError",
           "FORMAT_VERSION", "Unfreeze", "conv_blocks", "freeze_blocks", "frozen_blocks", "confusion_matrix", "per_class_accuracy", "softmax", "topk_accuracy",
           "topk_correct", "plot_history", "plot_confusion", "plot_image_grid",
           "plot_grad_flow", "gradient_norms", "GradFlowRecorder"]
