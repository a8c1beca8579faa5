"""SGD, Adam and AdamW: turn each parameter's gradient into an in-place update.

The update rules are PyTorch's, line for line (torch.optim.SGD / Adam / AdamW,
single-tensor path), so a minivgg model and a torch model given the same
weights and gradients take the same steps; tests/test_optim.py checks it.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..kernels.threads import over_blocks


class Optimizer:
    """What every optimizer shares: the parameter walk, `lr`, and its saved state.

    `model` is anything with ``named_parameters()`` yielding (name, param, grad),
    such as a minivgg Layer; frozen layers are not yielded, so they never move.
    Each step re-reads that list, because backward replaces the grad arrays.
    Parameters are updated in place (``p -= ...``), so the layers keep their
    references. Per-parameter state (momentum buffers, Adam moments) is keyed
    by the parameter's dotted name and created on its first step.
    """

    # names of the float/bool hyperparameters kept in state_dict (besides lr)
    hyperparameters: tuple[str, ...] = ()

    def __init__(self, model, lr):
        if not hasattr(model, "named_parameters"):
            raise TypeError(f"{type(self).__name__}: expected a model with named_parameters() "
                            f"(a minivgg Layer), got {type(model).__name__}")
        self.model = model
        self.lr = lr
        self.state: dict[str, dict] = {}   # param name -> {"step": int, "exp_avg": array, ...}

    # -- the learning rate, which schedules set between steps ------------------------
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        value = float(value)
        if not value >= 0.0:   # also rejects NaN
            raise ValueError(f"Invalid learning rate: {value} (must be >= 0)")
        self._lr = value

    # -- one optimization step ---------------------------------------------------------
    def step(self) -> None:
        """Update every trainable parameter that has a gradient; skip the others."""
        for name, p, g in self.model.named_parameters():
            if g is None:
                continue
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(f"{type(self).__name__}: gradient of '{name}' is {g.dtype} "
                                 f"{tuple(g.shape)}, its parameter is {p.dtype} {tuple(p.shape)}")
            backend.get_array_module(p, g)   # numpy and cupy mixed -> TypeError
            self._update(p, g, self.state.setdefault(name, {}))

    def _update(self, p, g, state: dict) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Drop the model's gradients (backward overwrites them anyway)."""
        self.model.zero_grad()

    # -- what each optimizer declares; saving and restoring lives at the end of the file -----
    def _state_shapes(self, p) -> dict[str, tuple | None]:
        """The per-parameter state entries and their shapes; None marks a host int (a step count)."""
        raise NotImplementedError

    def _check_hyperparameters(self) -> None:
        pass

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat {str: np.ndarray} dict that np.savez stores without pickling (see optimizer_state_dict)."""
        return optimizer_state_dict(self)

    def load_state_dict(self, d: dict) -> None:
        """Restore what state_dict saved, checked first (see load_optimizer_state)."""
        load_optimizer_state(self, d)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as torch.optim.SGD.

    With g the gradient, mu the momentum, tau the dampening, lambda the weight decay:
        d = g + lambda * p                          (L2 penalty in the gradient)
        b = d                       on the first step (no dampening),
        b = mu * b + (1 - tau) * d  afterwards
        d = d + mu * b  (nesterov)  or  d = b       (when mu != 0)
        p = p - lr * d
    """

    hyperparameters = ("momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, model, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(model, lr)
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)
        self._check_hyperparameters()

    def _check_hyperparameters(self) -> None:
        if not self.momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: {self.momentum} (must be >= 0)")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {self.weight_decay} (must be >= 0)")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _state_shapes(self, p):
        return {"momentum_buffer": p.shape}

    def _update(self, p, g, state):
        xp = backend.get_array_module(p)
        d = g                                         # read only: the layer's gradient
        if self.weight_decay != 0:
            d = xp.multiply(p, self.weight_decay)     # (1 temporary, owned)
            d += g
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.copy()
            else:
                buf *= self.momentum
                if self.dampening == 0:
                    buf += d
                else:
                    buf += (1.0 - self.dampening) * d
            if self.nesterov:
                look_ahead = xp.multiply(buf, self.momentum)   # d + mu * b
                look_ahead += d
                d = look_ahead
            else:
                d = buf
        p -= self.lr * d


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction and L2 weight decay.

    With t the parameter's step count (from 1), g the gradient:
        g     = g + lambda * p                  (L2; AdamW decays p directly instead)
        m     = beta1 * m + (1 - beta1) * g      running mean of g      (first moment)
        v     = beta2 * v + (1 - beta2) * g^2    running mean of g^2    (second moment)
        m_hat = m / (1 - beta1^t)                bias corrections: m and v start at 0,
        v_hat = v / (1 - beta2^t)                so early averages are too small
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)
    The code evaluates the last three lines in PyTorch's order (sqrt(v_hat) as
    sqrt(v) / sqrt(1 - beta2^t), lr / (1 - beta1^t) applied last), so its float32
    results equal torch.optim.Adam's to float32 rounding: PyTorch's vectorised loops
    round a few percent of the elements differently, by a unit or two in the last
    place of the step (tests/test_optim.py, tests/test_cpu_threads.py).
    """

    hyperparameters = ("beta1", "beta2", "eps", "weight_decay")
    decoupled = False   # AdamW: p *= 1 - lr * lambda before the Adam step

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(model, lr)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self._check_hyperparameters()

    def _check_hyperparameters(self) -> None:
        if not self.eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {self.eps} (must be >= 0)")
        for i, beta in enumerate((self.beta1, self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {self.weight_decay} (must be >= 0)")

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2

    def _state_shapes(self, p):
        return {"step": None, "exp_avg": p.shape, "exp_avg_sq": p.shape}

    def _update(self, p, g, state):
        xp = backend.get_array_module(p)
        if not state:
            state.update(step=0, exp_avg=xp.zeros_like(p), exp_avg_sq=xp.zeros_like(p))
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if self.weight_decay != 0:
            if self.decoupled:
                p *= 1.0 - self.lr * self.weight_decay
            else:
                g_l2 = xp.multiply(p, self.weight_decay)     # never write into the layer's grad
                g_l2 += g
                g = g_l2
        if xp is np and all(a.flags.c_contiguous for a in (p, g, m, v)):
            # On the CPU, the same arithmetic on blocks of ~1 MB, the blocks on the cores: a block
            # stays in cache through all ten passes instead of coming from memory ten times.
            # Elementwise, so the result is the same bit for bit.
            flat = [a.reshape(-1) for a in (p, g, m, v)]          # views: the writes land in p, m, v
            over_blocks(lambda s: self._adam(*(a[s] for a in flat), t), p.size, p.itemsize, block_bytes=2**20)
        else:
            self._adam(p, g, m, v, t)

    def _adam(self, p, g, m, v, t: int) -> None:
        """The moment updates and the step, in place in p, m and v."""
        xp = backend.get_array_module(p)
        beta1, beta2 = self.beta1, self.beta2
        # one scratch array holds each temporary in turn (the names say which): no other allocation
        scratch = xp.multiply(g, 1.0 - beta1)               # (1 - beta1) * g
        m *= beta1
        m += scratch                                        # m = beta1 * m + (1 - beta1) * g
        g2 = xp.multiply(g, g, out=scratch)
        g2 *= 1.0 - beta2                                   # (1 - beta2) * g^2
        v *= beta2
        v += g2                                             # v = beta2 * v + (1 - beta2) * g^2
        sqrt_v_hat = xp.sqrt(v, out=scratch)
        sqrt_v_hat /= math.sqrt(1.0 - beta2 ** t)           # sqrt(v_hat), v_hat = v / (1 - beta2^t)
        sqrt_v_hat += self.eps
        step = xp.divide(m, sqrt_v_hat, out=scratch)        # m / (sqrt(v_hat) + eps)
        step *= self.lr / (1.0 - beta1 ** t)                # lr * m_hat / (...), m_hat = m / (1 - beta1^t)
        p -= step


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    The decay shrinks the weights directly, outside the adaptive scaling:
        p = p * (1 - lr * lambda),  then the Adam step above with lambda = 0.
    """

    decoupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(model, lr, betas, eps, weight_decay)


# ---------------------------------------------------------------------------
# Saving and restoring: a flat dict of arrays that np.savez stores without pickling.
# ---------------------------------------------------------------------------
def optimizer_state_dict(opt) -> dict[str, np.ndarray]:
    """A flat {str: np.ndarray} dict that np.savez stores without pickling.

    Keys: 'type', 'lr', each hyperparameter, and 'state.<param name>.<entry>'
    (e.g. 'state.features.0.weight.exp_avg'). Arrays come back to the host.
    """
    d = {"type": np.array(type(opt).__name__), "lr": np.array(opt.lr, dtype=np.float64)}
    for h in opt.hyperparameters:
        d[h] = np.array(getattr(opt, h))
    for name, entries in opt.state.items():
        for key, value in entries.items():
            d[f"state.{name}.{key}"] = (np.array(value, dtype=np.int64) if isinstance(value, int)
                                        else backend.to_numpy(value).copy())
    return d


def load_optimizer_state(opt, d: dict) -> None:
    """Restore what state_dict saved, onto the device and dtype of the parameters.

    Everything is checked before anything changes; a mismatch names its key.
    """
    d = dict(d)   # also reads an NpzFile from np.load
    params = dict(_all_parameters(opt.model))
    loaded = _checked_state(opt, d, params)
    old = {h: getattr(opt, h) for h in ("lr",) + opt.hyperparameters}
    try:
        for h in old:
            setattr(opt, h, np.asarray(d[h]).item())
        opt._check_hyperparameters()
    except ValueError:
        for h, v in old.items():
            setattr(opt, h, v)
        raise
    opt.state = {}
    for name, entries in loaded.items():
        p = params[name]
        opt.state[name] = {k: int(np.asarray(v)) if opt._state_shapes(p)[k] is None
                            else backend.to_device(np.array(backend.to_numpy(v), dtype=p.dtype),
                                                   backend.device_of(p))
                            for k, v in entries.items()}


def _checked_state(opt, d: dict, params: dict) -> dict[str, dict]:
    """{param name: {entry: array}} from a state_dict, every key and shape checked."""
    kind = str(np.asarray(d.get("type", "")))
    if kind != type(opt).__name__:
        raise ValueError(f"{type(opt).__name__}.load_state_dict: the state was saved by "
                         f"optimizer {kind!r}")
    missing = [k for k in ("lr",) + opt.hyperparameters if k not in d]
    if missing:
        raise KeyError(f"{type(opt).__name__}.load_state_dict: missing key(s) {missing}")
    loaded: dict[str, dict] = {}
    for key, value in d.items():
        if not key.startswith("state."):
            if key not in ("type", "lr") + opt.hyperparameters:
                raise KeyError(f"{type(opt).__name__}.load_state_dict: unexpected key '{key}'")
            continue
        name, _, entry = key[len("state."):].rpartition(".")
        if name not in params:
            raise KeyError(f"{type(opt).__name__}.load_state_dict: '{key}' names no parameter "
                           f"of the model")
        shapes = opt._state_shapes(params[name])
        if entry not in shapes:
            raise KeyError(f"{type(opt).__name__}.load_state_dict: unexpected key '{key}' "
                           f"(expected entries {sorted(shapes)})")
        expected = () if shapes[entry] is None else tuple(shapes[entry])
        if tuple(np.shape(value)) != expected:
            raise ValueError(f"{type(opt).__name__}.load_state_dict: '{key}' has shape "
                             f"{tuple(np.shape(value))}, expected {expected}")
        loaded.setdefault(name, {})[entry] = value
    for name, entries in loaded.items():
        if set(entries) != set(opt._state_shapes(params[name])):
            raise KeyError(f"{type(opt).__name__}.load_state_dict: state of '{name}' has "
                           f"entries {sorted(entries)}, expected {sorted(opt._state_shapes(params[name]))}")
    return loaded


def _all_parameters(model):
    """(name, param) for every parameter, frozen ones too (their state is kept)."""
    try:
        triples = model.named_parameters(trainable_only=False)
    except TypeError:   # a model whose named_parameters takes no arguments
        triples = model.named_parameters()
    return [(name, p) for name, p, _ in triples]
