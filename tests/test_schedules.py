"""Learning-rate schedules against torch.optim.lr_scheduler, warmup included, and their saved state."""
import warnings

import numpy as np
import pytest
import torch

from minivgg.layers import Linear
from minivgg.optim import (SGD, CosineAnnealingLR, ExponentialLR, LinearWarmup, StepLR,
                           make_scheduler)

BASE_LR = 0.1
EPOCHS = 20


def optimizers():
    """A minivgg SGD and a torch SGD, both at BASE_LR."""
    tparam = torch.nn.Parameter(torch.zeros(2))
    return SGD(Linear(2, 2), lr=BASE_LR), torch.optim.SGD([tparam], lr=BASE_LR)


def torch_lr(topt):
    return topt.param_groups[0]["lr"]


EPOCH_CASES = {
    "step": (lambda o: StepLR(o, 3, 0.5), lambda t: torch.optim.lr_scheduler.StepLR(t, 3, 0.5)),
    "step_1": (lambda o: StepLR(o, 1), lambda t: torch.optim.lr_scheduler.StepLR(t, 1)),
    "exp": (lambda o: ExponentialLR(o, 0.92), lambda t: torch.optim.lr_scheduler.ExponentialLR(t, 0.92)),
    "cosine": (lambda o: CosineAnnealingLR(o, EPOCHS),
               lambda t: torch.optim.lr_scheduler.CosineAnnealingLR(t, EPOCHS)),
    "cosine_wraps": (lambda o: CosineAnnealingLR(o, 7, eta_min=0.01),   # past T_max it climbs back
                     lambda t: torch.optim.lr_scheduler.CosineAnnealingLR(t, 7, eta_min=0.01)),
}


@pytest.mark.parametrize("case", list(EPOCH_CASES))
def test_epoch_schedules_match_torch(case):
    make, tmake = EPOCH_CASES[case]
    opt, topt = optimizers()
    sched, tsched = make(opt), tmake(topt)
    ours, theirs = [opt.lr], [torch_lr(topt)]
    for _ in range(EPOCHS):
        topt.step()
        tsched.step()
        sched.step_batch()  # a no-op for epoch schedules
        sched.step()
        ours.append(opt.lr)
        theirs.append(torch_lr(topt))
        assert sched.lr == opt.lr == sched.get_lr()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    assert len(set(np.round(ours, 12))) > 3  # the schedule did move


WARMUP_AFTER = {
    "alone": (lambda o: None, lambda t: None),
    "step": (lambda o: StepLR(o, 2, 0.5), lambda t: torch.optim.lr_scheduler.StepLR(t, 2, 0.5)),
    "exp": (lambda o: ExponentialLR(o, 0.9), lambda t: torch.optim.lr_scheduler.ExponentialLR(t, 0.9)),
    "cosine": (lambda o: CosineAnnealingLR(o, 10), lambda t: torch.optim.lr_scheduler.CosineAnnealingLR(t, 10)),
}


@pytest.mark.parametrize("warmup_steps", [2, 6])
@pytest.mark.parametrize("after", list(WARMUP_AFTER))
def test_warmup_matches_torch_linear_lr_chained(after, warmup_steps):
    """LinearWarmup == LinearLR(1/W, 1, W-1) per batch, chained with `after` per epoch."""
    steps_per_epoch = 4
    make, tmake = WARMUP_AFTER[after]
    opt, topt = optimizers()
    inner, tinner = make(opt), tmake(topt)
    sched = LinearWarmup(opt, warmup_steps, after=inner)
    twarm = torch.optim.lr_scheduler.LinearLR(topt, start_factor=1 / warmup_steps, end_factor=1.0,
                                              total_iters=warmup_steps - 1)
    ours, theirs = [], []
    for _ in range(EPOCHS // 2):
        for _ in range(steps_per_epoch):
            ours.append(opt.lr)          # the lr this optimizer step uses
            theirs.append(torch_lr(topt))
            topt.step()
            twarm.step()
            sched.step_batch()
        if tinner is not None:
            tinner.step()
        sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    if inner is None:  # the ramp written out: base/W, 2 base/W, ..., base, then base
        expected = [BASE_LR * min(1, (k + 1) / warmup_steps) for k in range(len(ours))]
        np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_warmup_of_one_step_is_no_warmup():
    opt, _ = optimizers()
    sched = LinearWarmup(opt, 1)
    assert opt.lr == BASE_LR
    sched.step_batch()
    sched.step()
    assert opt.lr == BASE_LR


SAVED = {
    "step": lambda o: StepLR(o, 3, 0.5),
    "exp": lambda o: ExponentialLR(o, 0.92),
    "cosine": lambda o: CosineAnnealingLR(o, 12, eta_min=1e-3),
    "warmup": lambda o: LinearWarmup(o, 10),
    "warmup_cosine": lambda o: LinearWarmup(o, 10, after=CosineAnnealingLR(o, 12)),
}


@pytest.mark.parametrize("case", list(SAVED))
def test_state_dict_round_trip(case, tmp_path):
    def run(sched, opt, epochs):
        lrs = []
        for _ in range(epochs):
            for _ in range(3):
                lrs.append(opt.lr)
                sched.step_batch()
            sched.step()
        return lrs

    opt, _ = optimizers()
    sched = SAVED[case](opt)
    run(sched, opt, 2)  # stop mid-warmup: 6 of 10 steps
    state = sched.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.savez(tmp_path / "sched.npz", **state)

    opt2, _ = optimizers()
    opt2.lr = 5.0  # a resumed optimizer starts from its own lr; the state decides
    sched2 = SAVED[case](opt2)
    with np.load(tmp_path / "sched.npz", allow_pickle=False) as f:
        sched2.load_state_dict(f)
    assert opt2.lr == opt.lr
    assert run(sched2, opt2, 6) == run(sched, opt, 6)  # bit-identical


def test_load_state_dict_rejects_a_different_schedule():
    opt, _ = optimizers()
    state = StepLR(opt, 3).state_dict()
    with pytest.raises(ValueError, match="'StepLR'"):
        CosineAnnealingLR(opt, 5).load_state_dict(state)
    with pytest.raises(KeyError, match="last_epoch"):
        StepLR(opt, 3).load_state_dict({k: v for k, v in state.items() if k != "last_epoch"})
    warm = LinearWarmup(opt, 3, after=StepLR(opt, 2)).state_dict()
    with pytest.raises(KeyError, match="after"):
        LinearWarmup(opt, 3).load_state_dict(warm)


@pytest.mark.parametrize("build,message", [
    (lambda o: StepLR(o, 0), "step_size"),
    (lambda o: StepLR(o, 2.5), "step_size"),
    (lambda o: StepLR(o, 2, gamma=0), "gamma"),
    (lambda o: ExponentialLR(o, -0.9), "gamma"),
    (lambda o: CosineAnnealingLR(o, 0), "T_max"),
    (lambda o: CosineAnnealingLR(o, 5, eta_min=-1), "eta_min"),
    (lambda o: LinearWarmup(o, 0), "warmup_steps"),
    (lambda o: LinearWarmup(o, 5, after=StepLR(SGD(Linear(2, 2), 0.1), 2)), "same optimizer"),
])
def test_bad_arguments(build, message):
    opt, _ = optimizers()
    with pytest.raises(ValueError, match=message):
        build(opt)


def test_make_scheduler():
    opt, _ = optimizers()
    assert make_scheduler("none", opt, epochs=10, steps_per_epoch=5) is None
    s = make_scheduler("step", opt, epochs=30, steps_per_epoch=5)
    assert isinstance(s, StepLR) and (s.step_size, s.gamma) == (10, 0.1)
    opt.lr = BASE_LR
    s = make_scheduler("exp", opt, epochs=30, steps_per_epoch=5, gamma=0.5)
    assert isinstance(s, ExponentialLR) and s.gamma == 0.5
    opt.lr = BASE_LR
    s = make_scheduler("cosine", opt, epochs=30, steps_per_epoch=5, warmup_epochs=0.4)
    assert isinstance(s, LinearWarmup) and isinstance(s.after, CosineAnnealingLR)
    assert s.warmup_steps == 2
    assert s.after.T_max == 30 and opt.lr == pytest.approx(BASE_LR / s.warmup_steps)
    opt.lr = BASE_LR
    s = make_scheduler("none", opt, epochs=3, steps_per_epoch=5, warmup_steps=4)
    assert isinstance(s, LinearWarmup) and s.after is None and s.warmup_steps == 4
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        make_scheduler("linear", opt, epochs=3)
    with pytest.raises(ValueError, match="gamma"):
        make_scheduler("cosine", opt, epochs=3, gamma=0.5)
    with pytest.raises(ValueError, match="epochs"):
        make_scheduler("cosine", opt, epochs=0)


def test_torch_emits_no_order_warning():
    """Guard for the comparisons above: torch is driven in the order it expects."""
    _, topt = optimizers()
    tsched = torch.optim.lr_scheduler.StepLR(topt, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topt.step()
        tsched.step()
