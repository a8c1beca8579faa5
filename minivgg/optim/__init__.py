"""Optimizers, learning-rate schedules and gradient clipping, with PyTorch's semantics.

Reading order: optimizers (SGD, Adam, AdamW), schedules, clip.
"""
from .clip import clip_grad_norm
from .optimizers import SGD, Adam, AdamW, Optimizer
from .schedules import (SCHEDULES, CosineAnnealingLR, ExponentialLR, LinearWarmup, Schedule, StepLR,
                        make_scheduler)

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Schedule", "StepLR", "ExponentialLR",
           "CosineAnnealingLR", "LinearWarmup", "make_scheduler", "SCHEDULES", "clip_grad_norm"]
