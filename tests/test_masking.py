import pytest
import torch

from modules.conditioning import ConditionMasking

TOKENS = [20, 2, 2, 5, 3, 3, 3]  # BIKED-like vocabulary sizes = mask tokens


def conditions(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, t, (n,), generator=g) for t in TOKENS], dim=1)
    num = torch.rand((n, 2), generator=g)
    return cat, num


@pytest.fixture
def masking():
    return ConditionMasking(TOKENS, 2, sentinel=-1.0)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_masked_fraction_matches_p(masking, p):
    cat, num = conditions()
    out = masking(cat, num, p, torch.Generator().manual_seed(1))
    cat_masked = out.categorical == torch.tensor(TOKENS)
    fraction = torch.cat([cat_masked, out.numerical_mask], dim=1).float().mean().item()
    assert abs(fraction - p) < 0.01
    # every column is masked at rate p, not just the average
    per_column = torch.cat([cat_masked, out.numerical_mask], dim=1).float().mean(0)
    assert torch.all((per_column - p).abs() < 0.03)


def test_masks_are_independent_across_elements(masking):
    cat, num = conditions()
    p = 0.3
    out = masking(cat, num, p, torch.Generator().manual_seed(2))
    m = torch.cat([out.categorical == torch.tensor(TOKENS), out.numerical_mask], dim=1).float()
    both = (m[:, 0] * m[:, 1]).mean().item()
    assert abs(both - p * p) < 0.01  # P(both masked) = p² for independent masks
    corr = torch.corrcoef(m.T)
    off_diagonal = corr[~torch.eye(m.shape[1], dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.03
    # and across samples: a row is not all-or-nothing
    full_rows = (m.sum(1) == m.shape[1]).float().mean().item()
    assert full_rows < 0.001


def test_input_untouched_and_values(masking):
    cat, num = conditions(n=500)
    cat_before, num_before = cat.clone(), num.clone()
    out = masking(cat, num, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(cat, cat_before) and torch.equal(num, num_before)
    tokens = torch.tensor(TOKENS).expand_as(cat)
    masked_cat = out.categorical == tokens
    assert torch.equal(out.categorical[~masked_cat], cat[~masked_cat])
    # masked numerical conditions hold the sentinel -1 (the authors' code writes 0 there)
    assert torch.all(out.numerical[out.numerical_mask] == -1.0)
    assert torch.equal(out.numerical[~out.numerical_mask], num[~out.numerical_mask])
    assert out.numerical_mask.any() and (~out.numerical_mask).any()


def test_p_one_masks_everything_and_equals_mask_all(masking):
    cat, num = conditions(n=64)
    out = masking(cat, num, 1.0)
    everything = masking.mask_all(64)
    assert torch.equal(out.categorical, everything.categorical)
    assert torch.equal(out.numerical, everything.numerical)
    assert torch.all(out.numerical_mask)


def test_p_zero_masks_only_missing_values(masking):
    cat, num = conditions(n=100)
    cat[3, 0] = TOKENS[0]  # a missing category is already its mask token
    num[5, 1] = float("nan")  # a missing number is NaN
    out = masking(cat, num, 0.0)
    assert torch.equal(out.categorical, cat)
    assert out.numerical_mask.sum() == 1 and out.numerical_mask[5, 1]
    assert out.numerical[5, 1] == -1.0
    assert not torch.isnan(out.numerical).any()


def test_seeded_generator_reproduces_masks(masking):
    cat, num = conditions(n=300)
    a = masking(cat, num, 0.4, torch.Generator().manual_seed(7))
    b = masking(cat, num, 0.4, torch.Generator().manual_seed(7))
    c = masking(cat, num, 0.4, torch.Generator().manual_seed(8))
    assert torch.equal(a.categorical, b.categorical) and torch.equal(a.numerical_mask, b.numerical_mask)
    assert not torch.equal(a.categorical, c.categorical)


def test_explicit_masks(masking):
    cat, num = conditions(n=4)
    cat_mask = torch.zeros_like(cat, dtype=torch.bool)
    cat_mask[0, 2] = True
    num_mask = torch.zeros_like(num, dtype=torch.bool)
    num_mask[1, 0] = True
    out = masking.apply(cat, num, cat_mask, num_mask)
    assert out.categorical[0, 2] == TOKENS[2]
    assert (out.categorical != cat).sum() <= 1
    assert out.numerical[1, 0] == -1.0 and out.numerical_mask.sum() == 1


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_probability_outside_unit_interval_is_rejected(masking, p):
    cat, num = conditions(n=4)
    with pytest.raises(ValueError, match="masking probability"):
        masking(cat, num, p)
