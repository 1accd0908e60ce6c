import pandas as pd
import pytest
import torch

from modules.conditioning import ConditionEmbedding, ConditionMasking, ConditionSchema
from modules.config import ConditionSpec
from modules.errors import UserError


@pytest.fixture
def cars_like():
    frame = pd.DataFrame({
        "make": ["A", "B", "C", "A"],
        "buzz1": ["Sportlich", "Elegant", "Klein", "Groß"],
        "buzz2": ["Elegant", "Modern", None, "Sportlich"],
        "drag": [0.25, 0.30, None, 0.45],
    })
    specs = [ConditionSpec("make", "categorical"), ConditionSpec("buzz1", "categorical", vocabulary="buzz"),
             ConditionSpec("buzz2", "categorical", vocabulary="buzz"), ConditionSpec("drag", "numerical")]
    return frame, ConditionSchema.fit(specs, frame)


def test_schema_vocabularies_and_statistics(cars_like):
    frame, schema = cars_like
    assert schema.vocabularies["make"] == ["A", "B", "C"]
    assert schema.vocabularies["buzz"] == ["Elegant", "Groß", "Klein", "Modern", "Sportlich"]  # union, shared
    assert schema.mask_tokens() == [3, 5, 5]
    assert schema["drag"].minimum == 0.25 and schema["drag"].maximum == 0.45
    cat, num = schema.encode(frame)
    assert cat.tolist() == [[0, 4, 0], [1, 0, 3], [2, 2, 5], [0, 1, 4]]  # missing buzz2 → mask token 5
    assert torch.allclose(num[[0, 1, 3], 0], torch.tensor([0.0, 0.25, 1.0]))
    assert torch.isnan(num[2, 0])
    restored = ConditionSchema.from_state(schema.state_dict())
    assert restored.vocabularies == schema.vocabularies and restored["drag"].maximum == 0.45


def test_fixed_category_order_and_integral_floats():
    frame = pd.DataFrame({"fork": [2.0, 0.0, None, 1.0], "size": ["M", "XS", "L", "M"]})
    specs = [ConditionSpec("fork", "categorical", categories=[0, 1, 2]),
             ConditionSpec("size", "categorical", categories=["XS", "S", "M", "L", "XL"])]
    schema = ConditionSchema.fit(specs, frame)
    cat, _ = schema.encode(frame)
    assert schema.vocabularies["fork"] == ["0", "1", "2"]
    assert cat[:, 0].tolist() == [2, 0, 3, 1]  # '2.0' reads as category '2'; missing → token 3
    assert cat[:, 1].tolist() == [2, 0, 3, 2]


def test_unknown_category_names_column_and_valid_values(cars_like):
    _, schema = cars_like
    with pytest.raises(UserError, match=r"column 'make' has the category 'Z'.*Valid categories: A, B, C"):
        schema.encode(pd.DataFrame({"make": ["Z"]}))


def test_embedding_shapes_and_shared_table(cars_like):
    frame, schema = cars_like
    emb = ConditionEmbedding(schema, dim=5)
    assert emb.out_dim == 4 * 5
    assert emb.table.num_embeddings == (3 + 1) + (5 + 1)  # one n+1 table per vocabulary, buzzwords share one
    masking = ConditionMasking.for_schema(schema)
    out = emb(masking(*schema.encode(frame), 0.0))
    assert out.shape == (4, 20)
    # buzz1 of row 0 and buzz2 of row 3 are both 'Sportlich': the same table row
    assert torch.equal(out[0, 5:10], out[3, 10:15])
    # the numerical slot is the linear projection x·W + b of the normalised value
    x = (0.30 - 0.25) / 0.20
    assert torch.allclose(out[1, 15:20], x * emb.num_weight[0] + emb.num_bias[0])
    # masked numerical value projects the sentinel -1
    assert torch.allclose(out[2, 15:20], -1.0 * emb.num_weight[0] + emb.num_bias[0])


def test_learned_missing_embedding(cars_like):
    frame, schema = cars_like
    emb = ConditionEmbedding(schema, dim=3, numerical_mask="learned")
    masking = ConditionMasking.for_schema(schema)
    out = emb(masking(*schema.encode(frame), 0.0))
    assert torch.equal(out[2, -3:], emb.num_missing[0].detach())  # row 2 has no drag value
    assert not torch.allclose(out[0, -3:], emb.num_missing[0])
    all_masked = emb(masking.mask_all(2))
    assert torch.equal(all_masked[0], all_masked[1])
    out.sum().backward()
    assert emb.num_missing.grad is not None and emb.num_missing.grad.abs().sum() > 0


def test_mask_token_row_is_its_own_embedding(cars_like):
    _, schema = cars_like
    emb = ConditionEmbedding(schema, dim=4)
    masking = ConditionMasking.for_schema(schema)
    masked = emb(masking.mask_all(1))
    codes = torch.arange(3)
    rows = emb.table(codes)
    assert not any(torch.equal(masked[0, :4], r) for r in rows)
