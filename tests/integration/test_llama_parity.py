"""Layout parity for the Llama-family block (RMSNorm, rope, SwiGLU, grouped-query attention, no linear
biases; untied and tied output layer): the parity model of test_layout_parity.py with those parts gives
the single process's per-step loss and grad norm (fp32, rtol 1e-5, no dropout) at tp 2 and 4 (tp 4
exceeds the 2 key/value groups: each group is shared by 2 ranks), pp 2 with vp 2, dp 2 with ZeRO 1 and
3, and tp x pp x dp mixes (tp 4 with ZeRO-3 and with pp 2 on 8 ranks).
"""

import pytest

from tests.integration.test_layout_parity import RTOL, STEPS, Layout, layout_id, run_launches

L = Layout
LAUNCHES = {  # world size -> layouts (dp = world / (tp x pp)); micro 2 -> accumulation 4 / 2 / 1
    1: [L(model="llama"), L(model="llama-tied")],
    2: [L(tp=2, model="llama"), L(zero=1, model="llama"), L(zero=3, model="llama"),
        L(pp=2, vp=2, model="llama"), L(pp=2, vp=2, model="llama-tied"), L(tp=2, model="llama-tied")],
    4: [L(tp=4, model="llama"), L(tp=4, model="llama-tied"), L(tp=2, zero=3, model="llama"),
        L(tp=2, pp=2, vp=2, model="llama"), L(pp=2, zero=1, model="llama-tied")],
    # tp 4 > 2 groups with ZeRO-3 over dp 2 (replica gradient sums, then sharded), and with pp 2
    8: [L(tp=4, zero=3, model="llama"), L(tp=4, pp=2, model="llama-tied")],
}


@pytest.fixture(scope="module")
def histories(tiny_dataset):
    return run_launches(LAUNCHES, *tiny_dataset)


CASES = [(w, layout) for w, layouts in LAUNCHES.items() for layout in layouts if w > 1]


@pytest.mark.parametrize("key", CASES, ids=[layout_id(*k) for k in CASES])
def test_llama_layout_matches_single_process(histories, key):
    reference, got = histories[(1, L(model=key[1].model))], histories[key]
    assert len(got) == len(reference) == STEPS
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"step {step} grad norm {norm} vs {ref_norm}"


@pytest.mark.parametrize("model", ["llama", "llama-tied"])
def test_llama_trains(histories, model):
    # lr 1e-3 (LLAMA_LR): at 2e-3 this model passes a grad-norm spike around step 6 in which the
    # layouts' fp32 rounding differences grow to 1e-4 in the grad norm for a few steps (the losses stay
    # within 2e-7); at 1e-3 every layout stays within 2e-6, and the loss falls more slowly
    losses = [loss for loss, _ in histories[(1, L(model=model))]]
    assert losses[-1] < losses[0] - 0.2, losses
