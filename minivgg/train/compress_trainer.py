"""The training loop with compression's two extra terms: a teacher to distil from, and the L1 penalty on
BatchNorm scales that network slimming prunes by. Everything else (accumulation, checkpoints that resume,
evaluation, plots) is Trainer's, so a pruned or distilled network is an ordinary checkpoint.

One micro-batch, for student logits s = model(x):
    teacher:   t = teacher(x) in eval mode, no backward;  L = DistillationLoss(s, y, t)  (minivgg/distill.py)
    otherwise: L = the Trainer's loss_fn(s, y)
    sparsity:  L += lambda * sum over every BatchNorm2d of sum|gamma|, its subgradient added after the
               backward by BatchNorm2d.l1_penalty (minivgg/layers/norm.py)
"""
from __future__ import annotations

from ..distill import DistillationLoss
from ..layers import BatchNorm2d
from .trainer import Trainer


class CompressTrainer(Trainer):
    """Trainer(...) plus teacher= (a model; its logits are the soft targets), temperature=, alpha=
    (DistillationLoss) and sparsity= (the L1 strength on every BatchNorm scale, 0 = off)."""

    def __init__(self, model, optimizer, train_loader, *args, teacher=None, temperature: float = 4.0,
                 alpha: float = 0.9, sparsity: float = 0.0, **kwargs):
        if kwargs.get("amp"):
            raise ValueError("CompressTrainer: mixed precision is not supported with a teacher or a "
                             "sparsity penalty; train in float32")
        if not float(sparsity) >= 0:
            raise ValueError(f"CompressTrainer: sparsity must be >= 0, got {sparsity}")
        if teacher is not None:
            kwargs["loss_fn"] = DistillationLoss(temperature, alpha)
            teacher.eval()
        super().__init__(model, optimizer, train_loader, *args, **kwargs)
        self.teacher, self.sparsity = teacher, float(sparsity)
        self.norms = [m for _, m in self.model.modules() if isinstance(m, BatchNorm2d) and not m.frozen]
        if self.sparsity and not self.norms:
            raise ValueError("CompressTrainer: sparsity needs BatchNorm2d layers (a VGG built with _bn)")

    def _micro_batch(self, x, y):
        logits = self.precision.forward(x)                              # (B, K)
        if self.teacher is not None:
            loss = self.loss_fn(logits, y, self.teacher.forward(x))     # () teacher: eval, forward only
        else:
            loss = self.loss_fn(logits, y)                              # ()
        self.precision.backward(self.loss_fn.backward())
        for bn in self.norms if self.sparsity else ():
            loss = loss + bn.l1_penalty(self.sparsity)                  # grads[weight] += lambda sign(gamma)
        correct = (logits.argmax(axis=1) == y).sum()                    # ()
        return loss, correct
