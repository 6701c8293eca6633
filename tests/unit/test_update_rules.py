"""Update rules (megazero/optim/update_rules.py) against torch.optim, and offload over a rule's declared
state: each rule's step equals the torch.optim class it names bit for bit, over several steps, with a
decayed and an undecayed group (as ZeRO calls it); offloaded SGD (host and NVMe) equals SGD on the device."""

from __future__ import annotations

import pytest
import torch

from megazero.config import OptimizerConfig
from megazero.optim.update_rules import CpuAdam, Sgd, StateTensor, TorchAdam, build_update_rule
from megazero.zero.offload import OffloadedOptimizer

STEPS = 4
SIZES = (1000, 37, 513)  # flat fragments; the second one is not decayed (a bias)
DECAYS = (True, False, True)
LR, WD = 0.05, 0.1


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in SIZES]
    grads = [[torch.randn(n, generator=gen) for n in SIZES] for _ in range(STEPS)]
    return params, grads


def _step_rule(rule, params, grads_per_step):
    """Steps as the ZeRO optimizer does: one call per decay group, decayed first."""
    params = [p.clone() for p in params]
    state = [rule.init_state(p.numel()) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for decay in (True, False):
            idx = [i for i, d in enumerate(DECAYS) if d == decay]
            rule.step([params[i] for i in idx], [grads[i].clone() for i in idx],
                      {n: [state[i][n] for i in idx] for n in rule.state_names}, lr=LR, step=step,
                      weight_decay=WD if decay else 0.0)
    return params, state


def _step_torch(cls, params, grads_per_step, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    groups = [{"params": [p for p, d in zip(params, DECAYS) if d], "weight_decay": WD},
              {"params": [p for p, d in zip(params, DECAYS) if not d], "weight_decay": 0.0}]
    opt = cls(groups, lr=LR, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_torch_adam_equals_torch_optim_bitwise(decoupled):
    params, grads = _problem()
    rule = TorchAdam((0.9, 0.95), 1e-8, decoupled=decoupled)
    ours, state = _step_rule(rule, params, grads)
    theirs, opt = _step_torch(torch.optim.AdamW if decoupled else torch.optim.Adam, params, grads,
                              betas=(0.9, 0.95), eps=1e-8)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b.detach()), i
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][name], opt.state[b][name]), (i, name)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_equals_torch_optim_bitwise(momentum):
    params, grads = _problem(1)
    rule = Sgd(momentum)
    assert rule.state_names == (("momentum_buffer",) if momentum else ())
    ours, state = _step_rule(rule, params, grads)
    theirs, opt = _step_torch(torch.optim.SGD, params, grads, momentum=momentum)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b.detach()), i
        if momentum:  # torch's first step copies the gradient into the buffer; ours starts at zero: the same
            assert torch.equal(state[i]["momentum_buffer"], opt.state[b]["momentum_buffer"]), i


def test_cpu_adam_rule_steps_like_torch_adam():
    params, grads = _problem(2)
    kernel, _ = _step_rule(CpuAdam((0.9, 0.95), 1e-8), params, grads)
    torch_rule, _ = _step_rule(TorchAdam((0.9, 0.95), 1e-8), params, grads)
    for a, b in zip(kernel, torch_rule):  # bit-equal by design (test_cpu_adam.py); a tolerance here
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_rules_declare_their_state_and_build_from_config():
    rule = build_update_rule(OptimizerConfig())
    assert isinstance(rule, TorchAdam) and not isinstance(rule, CpuAdam) and rule.name == "adamw"
    assert rule.state == (StateTensor("exp_avg"), StateTensor("exp_avg_sq"))
    assert isinstance(build_update_rule(OptimizerConfig(), offload=True), CpuAdam)
    assert build_update_rule(OptimizerConfig(optimizer_type="adam_l2")).name == "adam_l2"
    sgd = build_update_rule(OptimizerConfig(optimizer_type="sgd", sgd_momentum=0.5), offload=True)
    assert isinstance(sgd, Sgd) and sgd.momentum == 0.5 and sgd.name == "sgd"
    init = sgd.init_state(7)
    assert list(init) == ["momentum_buffer"] and init["momentum_buffer"].dtype == torch.float32
    assert not init["momentum_buffer"].any()


@pytest.mark.parametrize("mode", ["cpu", "nvme"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_offloaded_sgd_equals_sgd_on_the_device(tmp_path, mode, model_dtype):
    """Fragments cut into several sub-groups (decayed pieces first); grad_scale folded in on the host."""
    params, grads = _problem(3)
    rule, scale = Sgd(0.9), 0.5
    values = [p.to(model_dtype) for p in params]
    ours = OffloadedOptimizer([v.clone() for v in values], list(DECAYS), rule, mode=mode, sub_group_size=400,
                              nvme_path=str(tmp_path), rank_tag="rank0", device=torch.device("cpu"), weight_decay=WD)
    assert len(ours.groups) > 1
    for step_grads in grads:
        ours.step([g.clone() for g in step_grads], scale, LR, host_grads_ready=False)
    masters = [v.float() for v in values]
    reference, _ = _step_rule(rule, masters, [[g * scale for g in gs] for gs in grads])
    exported = ours.export_state()
    for i, (value, want) in enumerate(zip(ours.values, reference)):
        assert exported[i].shape == (2, SIZES[i])  # master, momentum_buffer
        assert torch.equal(exported[i][0], want), i
        assert torch.equal(value, want.to(model_dtype)), i
    ours.close()
