"""Mixed precision: compute in float16, keep the weights and the optimizer in float32, scale the loss.

Trainer(amp=True) and `train_vgg11.py --amp` use it; this file is the whole mechanism.

Why three pieces
----------------
float16 halves the memory of activations and runs on a GPU's tensor cores, but it has
10 mantissa bits (unit roundoff u = 2^-11, about 4.9e-4) and a narrow range: the largest
value is 65504 and anything below 2^-24 (about 6e-8) is zero. Training in it naively
fails in three ways, and each piece below answers one:

1. Master weights (MixedPrecision). An Adam or SGD step changes a weight by lr * (something
   of order 1), often less than u times the weight: in float16 `w + dw == w` and learning
   stops. So the float32 model the optimizer updates stays the truth ("master weights");
   before every forward pass its weights are rounded into a float16 working copy:
       W16 = fp16(W32)            forward and backward run on W16 and float16 activations
       g32 = fp32(g16) / S        the float16 gradients come back to the master in float32
       W32 <- optimizer(W32, g32) optimizer state (Adam's m and v) is float32 too
2. Loss scaling (LossScaler). Gradients of a loss averaged over a batch are small (the
   loss gradient itself is (softmax - onehot) / N); many fall under float16's 6e-8 and
   flush to zero. Multiplying the loss by S multiplies every gradient by S (backward is
   linear in dL), lifting them into range; dividing by S in float32 afterwards undoes it
   exactly when S is a power of two. Too large an S overflows to inf, so S is dynamic,
   as torch.amp.GradScaler's:
       any gradient inf or NaN -> skip this step (weights and optimizer state untouched),
                                  S <- S * backoff (0.5), start counting again
       `growth_interval` clean steps in a row -> S <- S * growth (2)
   starting from S = 2^16. The scale hovers just under the overflow point.
3. Float32 islands. Two computations lose too much in float16: BatchNorm's statistics
   (a variance is a mean of squares over N*H*W values; its running averages move by 0.1
   of a small difference each step), and softmax cross-entropy (exp, log and the mean).
   BatchNorm layers therefore keep float32 parameters and statistics and run in float32
   behind a cast (Float32Layer: float16 in, float32 inside, float16 out), and
   MixedPrecision.forward hands the loss float32 logits.

What a step costs the host: MixedPrecision.backward returns "did any gradient overflow?"
as a 0-d device array, and the Trainer reads it together with the loss in its one
device-to-host transfer per step, so mixed precision adds no synchronisation to a step.

Evaluation (Trainer's validation, evaluate()) runs the float32 master model.
On NumPy float16 works but is slow (NumPy's float16 matmul has no BLAS); it is here so the
CPU tests prove the numerics that a GPU run relies on.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from . import backend
from .layers.base import Layer
from .layers.norm import BatchNorm2d

#: the compute precision; the master weights are float32
HALF = np.float16


class LossScaler:
    """Dynamic loss scaling, with torch.amp.GradScaler's rule and defaults.

        S starts at init_scale (2^16)
        after a step whose gradients hold an inf or NaN: skip it, S <- S * backoff_factor,
            clean-step count <- 0
        after a clean step: count += 1; when count == growth_interval:
            S <- S * growth_factor (unless that overflows float32), count <- 0

    The scale lives on the host: it only changes after the step's overflow flag has been
    read, which happens anyway with the loss (one transfer per step).
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"LossScaler: init_scale must be a positive finite number, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"LossScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"LossScaler: backoff_factor must be in (0, 1), got {backoff_factor}")
        if isinstance(growth_interval, bool) or int(growth_interval) != growth_interval or growth_interval < 1:
            raise ValueError(f"LossScaler: growth_interval must be an integer >= 1, got {growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.clean_steps = 0      # clean steps since the scale last changed
        self.skipped_steps = 0    # steps skipped for inf/NaN gradients, in the whole run

    def update(self, found_inf: bool) -> bool:
        """Move the scale after a step; returns whether the optimizer may take that step."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return False
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            grown = self.scale * self.growth_factor
            if grown <= float(np.finfo(np.float32).max):   # GradScaler keeps a float32 scale
                self.scale = grown
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict:
        """Plain numbers (a checkpoint stores them as JSON)."""
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "clean_steps": self.clean_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"LossScaler.load_state_dict: expected keys {sorted(expected)}, got {got}")
        new = LossScaler(state["scale"], state["growth_factor"], state["backoff_factor"],
                         state["growth_interval"])   # validates the numbers
        self.__dict__.update(new.__dict__)
        self.clean_steps, self.skipped_steps = int(state["clean_steps"]), int(state["skipped_steps"])

    def __repr__(self):
        return (f"LossScaler(scale={self.scale:g}, growth_interval={self.growth_interval}, "
                f"clean_steps={self.clean_steps}, skipped_steps={self.skipped_steps})")


class Float32Layer(Layer):
    """Run `layer` in float32 inside a float16 network: a cast on the way in and on the way out.

        forward:  out16 = fp16(layer.forward(fp32(x16)))
        backward: dx16  = fp16(layer.backward(fp32(dout16)))
    The layer keeps its float32 parameters, gradients and buffers; mixed precision puts the
    master model's own BatchNorm2d layers here, so their running statistics are the master's.
    """

    def __init__(self, layer: Layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        self.cache = x.dtype
        with np.errstate(over="ignore"):
            return self.layer.forward(x.astype(np.float32)).astype(x.dtype)   # same shape as x

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward; run forward first")
        with np.errstate(over="ignore"):
            return self.layer.backward(dout.astype(np.float32)).astype(self.cache)

    def __repr__(self):
        return f"Float32Layer({self.layer!r})"


class Float16Gemm(Layer):
    """A Conv2d or Linear with float16 weights, input, output and grads, computed on NumPy in float32.

    NumPy's float16 matmul has no BLAS (about 40x slower than float32). A GPU's float16 GEMM
    multiplies float16 numbers exactly in float32, sums in float32 and rounds once to float16;
    running the float32 layer on float16 values and rounding its results does the same:
        forward:  out16 = fp16(layer32(fp32(x16); W = fp32(W16)))
        backward: dx16 = fp16(dx32), dW16 = fp16(dW32)   (an overflow still becomes inf)
    Only the bias add differs: one rounding here, two on the GPU. The GPU backend runs the
    layer itself in float16 instead.
    """

    def __init__(self, layer: Layer):
        super().__init__()
        self.layer = copy.copy(layer)                     # the same layer hyper-parameters
        self.layer.params = {k: p.copy() for k, p in layer.params.items()}   # float32 scratch
        self.layer.grads, self.layer.cache = {}, None
        self.params = {k: p.astype(HALF) for k, p in layer.params.items()}   # the float16 weights
        self.needs_input_grad, self.frozen = layer.needs_input_grad, layer.frozen

    def forward(self, x):
        for k, p in self.params.items():
            self.layer.params[k][...] = p                  # exact: every float16 is a float32
        self.cache = True
        return self.layer.forward(x.astype(np.float32)).astype(HALF)

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward; run forward first")
        self.layer.needs_input_grad = self.needs_input_grad    # set by the container (chain_backward)
        self.layer.frozen = self.frozen                        # and by the master (MixedPrecision)
        dx = self.layer.backward(dout.astype(np.float32))
        with np.errstate(over="ignore"):              # an overflow to inf is the signal, not an error
            self.grads = {k: g.astype(HALF) for k, g in self.layer.grads.items()}
            return None if dx is None else dx.astype(HALF)

    def __repr__(self):
        return f"Float16Gemm({self.layer!r})"


def working_copy(model: Layer) -> Layer:
    """The float16 twin of a float32 model: same structure, float16 parameters, fresh caches.

    Built with copy.deepcopy, whose `memo` ({id(original): its copy}) is filled in first
    with what must not be a plain copy:
      - each BatchNorm2d maps to Float32Layer(the master's own layer): float32, shared;
      - on NumPy, each Conv2d and Linear maps to Float16Gemm (float16 results at BLAS speed);
      - every other layer's params map to float16 casts, its grads and cache to nothing;
      - buffers and private random generators map to themselves (shared, so the
        master's checkpoints see the statistics and the generator state the run used).
    """
    from .layers import Conv2d, Linear
    on_numpy = backend.get_array_module(*[p for _, p, _ in model.named_parameters(False)]) is np
    memo: dict = {}
    for _, m in model.modules():
        if isinstance(m, BatchNorm2d):
            memo[id(m)] = Float32Layer(m)
            continue
        if on_numpy and isinstance(m, (Conv2d, Linear)):
            memo[id(m)] = Float16Gemm(m)
            continue
        memo[id(m.params)] = {k: p.astype(HALF) for k, p in m.params.items()}
        memo[id(m.grads)] = {}
        memo[id(m.buffers)] = m.buffers
        if m.cache is not None:
            memo[id(m.cache)] = None
        if getattr(m, "spare", None) is not None:
            memo[id(m.spare)] = None
        rng = getattr(m, "_rng", None)
        if rng is not None:
            memo[id(rng)] = rng
    return copy.deepcopy(model, memo)


class MixedPrecision:
    """Forward and backward of a float32 `model` in float16, with its gradients returned in float32.

    `model` stays the master: the optimizer, checkpoints and evaluation use it unchanged.
    Each step:
        logits32 = amp.forward(x)                  W16 <- fp16(W32); the float16 pass; fp32 logits
        loss = loss_fn(logits32, y)                 float32
        found_inf = amp.backward(loss_fn.backward())
                                                    dlogits * S in float32, then float16 backward;
                                                    model's grads <- fp32(g16) / S (float32)
        then optimizer.step() only if scaler.update(found_inf) says so.
    found_inf is a 0-d bool device array: read it with the loss, in the same transfer.
    """

    def __init__(self, model: Layer, scaler: LossScaler | None = None):
        self.model = model
        self.scaler = scaler if scaler is not None else LossScaler()
        self.working = working_copy(model)
        # (name, master layer, the layer whose grads feed it) for every layer with params
        working = dict(self.working.modules())
        self._pairs = []
        for name, m in model.modules():
            w = working[name]
            self._pairs.append((m, w.layer if isinstance(w, Float32Layer) else w, w))

    def _load_weights(self):
        """W16 <- fp16(W32) and the master's train/eval mode, before each forward pass."""
        for m, src, w in self._pairs:
            w.training = m.training
            w.frozen = src.frozen = m.frozen   # a phase change of the master (minivgg.train.transfer)
            if src is m:            # a Float32Layer: the master's own layer
                continue
            for k, p in m.params.items():
                h = src.params[k]
                if h.shape != p.shape:
                    raise ValueError(f"MixedPrecision: master weight {k} of {m!r} is now {tuple(p.shape)}, "
                                     f"the float16 copy {tuple(h.shape)}; build MixedPrecision again")
                h[...] = p          # a cast into the float16 array, on the device both live on

    def forward(self, x):
        """float32 logits (N, K) of the float16 network on x (any float dtype)."""
        self._load_weights()
        out = self.working.forward(x.astype(HALF, copy=False))           # (N, K) float16
        return out.astype(np.float32)                                     # (N, K) for the loss

    def backward(self, dlogits):
        """Scaled float16 backward; the model's trainable grads become float32, unscaled.

        Returns found_inf, a 0-d bool array on the device: True if any gradient is inf or NaN.
        """
        xp = backend.get_array_module(dlogits)
        S = self.scaler.scale
        with np.errstate(over="ignore", invalid="ignore"):   # inf and NaN are reported, not raised
            d16 = (dlogits.astype(np.float32) * np.float32(S)).astype(HALF)   # (N, K), scaled in float32
            self.working.backward(d16)
        inv_scale = np.float32(1.0 / S)                                   # exact: S is a power of two
        found_inf = xp.zeros((), dtype=bool)                              # ()
        for m, src, _ in self._pairs:
            if m.frozen:
                continue
            for k in m.params:
                g16 = src.grads.get(k)
                if g16 is None:
                    continue
                g = g16.astype(np.float32)                               # a new float32 array
                g *= inv_scale
                m.grads[k] = g
                found_inf = found_inf | ~xp.isfinite(g).all()             # ()
        return found_inf

    def train(self, mode: bool = True) -> "MixedPrecision":
        self.model.train(mode)
        return self

    def __repr__(self):
        return f"MixedPrecision({type(self.model).__name__}, {self.scaler!r})"

