"""Property tests (hypothesis) for the shared core: masking statistics and sparsity schedules."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.conditioning import ConditionMasking
from modules.sparsity import SCHEDULES, SparsitySchedule

probabilities = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(p=probabilities, n_cat=st.integers(0, 4), n_num=st.integers(0, 4), rows=st.integers(1, 3000),
       seed=st.integers(0, 2**31 - 1))
def test_masking_fraction_inputs_and_missing(p, n_cat, n_num, rows, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = list(range(10, 10 + n_cat))
    masking = ConditionMasking(tokens, n_num, sentinel=-1.0)
    cat = torch.randint(0, 10, (rows, n_cat), generator=g)
    num = torch.rand((rows, n_num), generator=g)
    num[torch.rand((rows, n_num), generator=g) < 0.1] = float("nan")  # missing cells
    cat_before, num_before = cat.clone(), num.clone()
    out = masking(cat, num, p, g)
    assert torch.equal(cat, cat_before) and torch.equal(num.isnan(), num_before.isnan())  # inputs untouched
    assert torch.equal(num[~num.isnan()], num_before[~num_before.isnan()])
    cat_masked = out.categorical == torch.tensor(tokens, dtype=torch.long)
    assert torch.equal(out.categorical[~cat_masked], cat[~cat_masked])  # unmasked entries keep their value
    assert out.numerical_mask[num.isnan()].all()  # missing stays masked
    assert (out.numerical[out.numerical_mask] == -1.0).all()
    kept = ~out.numerical_mask
    assert torch.equal(out.numerical[kept], num[kept])
    observed = ~num.isnan()
    draws = torch.cat([cat_masked.flatten(), out.numerical_mask[observed]]).float()
    if p == 0.0:
        assert draws.sum() == 0
    elif p == 1.0:
        assert draws.all()
    elif len(draws) >= 200:  # Bernoulli(p): within 6 standard deviations
        assert abs(draws.mean().item() - p) <= 6 * math.sqrt(p * (1 - p) / len(draws)) + 1e-9


@settings(max_examples=150, deadline=None)
@given(schedule=st.sampled_from(SCHEDULES), initial=probabilities, target=probabilities,
       target_at=st.integers(1, 300), step_size=st.integers(1, 50),
       rate=st.floats(-8, 8).filter(lambda r: abs(r) > 1e-3), extra=st.integers(0, 100))
def test_schedules_move_monotonically_and_hold_the_target(schedule, initial, target, target_at, step_size, rate,
                                                          extra):
    s = SparsitySchedule(schedule=schedule, initial=initial, target=target, target_at=target_at,
                         step_size=step_size, exponential_rate=rate)
    values = [s(t) for t in range(target_at + extra + 1)]
    end = s.end
    low, high = min(initial, end), max(initial, end)
    assert all(low - 1e-12 <= v <= high + 1e-12 for v in values)
    assert all(v == end for v in values[target_at:])  # the target, exactly, from target_at on
    if schedule != "constant":
        assert values[0] == initial
    rising = end >= initial
    for a, b in zip(values, values[1:]):
        assert (b >= a - 1e-12) if rising else (b <= a + 1e-12)
