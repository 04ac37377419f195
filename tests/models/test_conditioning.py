import warnings

import pandas as pd
import pytest
import torch

from mriflow.data.dataset import CovariateSchema
from mriflow.models.conditioning import CovariateEmbedding, drop_covariates, resolve_request


@pytest.fixture
def schema() -> CovariateSchema:
    table = pd.DataFrame({"age": [20, 31, 45, 52, 60, 71, 80], "sex": ["F", "M", "F", "M", "F", "M", "F"]})
    return CovariateSchema.fit(table, ["age", "sex"])


def embedding(drop_prob: float = 0.15) -> CovariateEmbedding:
    torch.manual_seed(0)
    return CovariateEmbedding(["continuous", "categorical"], [0, 3], embedding_dim=8, drop_prob=drop_prob)


def test_absent_covariates_use_the_null_embedding_whatever_their_values():
    module = embedding().eval()
    absent = torch.zeros(3, 2, dtype=torch.bool)
    values = torch.tensor([[0.3, 1.0], [-2.0, 2.0], [100.0, 0.0]])
    out = module(values, absent)
    torch.testing.assert_close(out, module.null.sum(0).expand(3, -1))
    torch.testing.assert_close(out, module(torch.zeros(3, 2), absent))
    module.train()
    nan_values = torch.full((3, 2), float("nan"))
    module(nan_values, absent).sum().backward()  # placeholders of absent entries must not poison gradients
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_each_covariate_switches_to_its_own_null():
    module = embedding().eval()
    values = torch.tensor([[0.5, 2.0]])
    both = module(values, torch.tensor([[True, True]]))
    age_only = module(values, torch.tensor([[True, False]]))
    sex_only = module(values, torch.tensor([[False, True]]))
    age = module.embedders[0](values[:, :1])
    sex = module.embedders[1](torch.tensor([2]))
    torch.testing.assert_close(both, age + sex)
    torch.testing.assert_close(age_only, age + module.null[1])
    torch.testing.assert_close(sex_only, module.null[0] + sex)
    assert not torch.allclose(module(torch.tensor([[0.5, 1.0]]), torch.ones(1, 2, dtype=torch.bool)), both)


def test_independent_dropout_rate():
    present = torch.ones(40000, 3, dtype=torch.bool)
    kept = drop_covariates(present, 0.15, torch.Generator().manual_seed(0))
    dropped = ~kept
    assert abs(dropped.float().mean().item() - 0.15) < 0.01
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()
    assert abs(both - 0.15**2) < 0.005  # independent across covariates
    assert not drop_covariates(torch.zeros(5, 3, dtype=torch.bool), 0.15).any()  # absent stays absent


def test_dropout_only_while_training():
    module = embedding(drop_prob=0.3).eval()
    values = torch.tensor([[0.5, 1.0]]).expand(4000, -1)
    present = torch.ones(4000, 2, dtype=torch.bool)
    null_age = module(values, torch.tensor([[False, True]]).expand(4000, -1))[0]
    module.train()
    out = module(values, present)
    rate = (out - null_age).abs().amax(1).lt(1e-6).float().mean().item()  # age dropped, sex kept
    assert abs(rate - 0.3 * 0.7) < 0.03
    module.eval()
    assert torch.equal(module(values, present), module(values, present))
    assert not (module(values, present) - null_age).abs().amax(1).lt(1e-6).any()


def test_bad_inputs_are_refused():
    module = embedding().eval()
    with pytest.raises(ValueError, match="category index"):
        module(torch.tensor([[0.0, 3.0]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        module(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind"):
        CovariateEmbedding(["ordinal"], [0], 8)


def test_from_schema(schema):
    module = CovariateEmbedding.from_schema(schema, embedding_dim=16)
    assert module.kinds == ("continuous", "categorical")
    assert module.embedders[1].num_embeddings == 2
    assert module(*(t[None] for t in resolve_request(schema, {"age": 40, "sex": "M"}))).shape == (1, 16)


def test_resolve_request_encodes_and_marks_missing(schema):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, present = resolve_request(schema, {"age": 45, "sex": "M"})
    age = schema["age"]
    torch.testing.assert_close(values, torch.tensor([(45 - age.mean) / age.std, 1.0]))
    assert present.tolist() == [True, True]
    values, present = resolve_request(schema, {"sex": "F"})
    assert present.tolist() == [False, True]
    _, present = resolve_request(schema, {})
    assert present.tolist() == [False, False]


def test_resolve_request_refuses_unknown_names_and_categories(schema):
    with pytest.raises(ValueError, match="'height'.*age, sex"):
        resolve_request(schema, {"age": 40, "height": 180})
    with pytest.raises(ValueError, match="unknown category 'X'.*F, M"):
        resolve_request(schema, {"sex": "X"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "-inf"])
def test_resolve_request_refuses_a_value_that_is_not_a_finite_number(schema, value):
    # NaN used to pass as "absent": --age nan drew unconditional samples and recorded "age": null.
    with pytest.raises(ValueError, match=r"covariate 'age': .* is not a finite number.*leave it out"):
        resolve_request(schema, {"age": value})


def test_resolve_request_warns_outside_the_training_range(schema):
    with pytest.warns(UserWarning, match=r"'age' = 95 is outside the training range \[20, 80\]"):
        values, present = resolve_request(schema, {"age": 95})
    assert present[0] and values[0] > 0


def test_typed_values_are_finite_numbers_or_text():
    from mriflow.models.conditioning import parse_value

    assert parse_value("45") == 45.0 and parse_value("F") == "F" and parse_value("1e3") == 1000.0
    assert parse_value("nan") == "nan" and parse_value("-inf") == "-inf"  # refused later for a continuous covariate
