"""The four models have the paper's exact parameter counts; the flat vector round-trips."""

import numpy as np
import pytest
import torch

from nvmlib.errors import ConfigError
from nvmlib.paper.models import MODELS, get_flat, make_model, n_params, set_flat

PAPER_COUNTS = {
    "model_2conv2fc": 21_840,
    "model_2fc": 795_010,
    "model_3fc": 1_290_510,
    "model_4fc": 2_797_010,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_counts_match_the_paper(name):
    model = make_model(name)
    assert n_params(model) == PAPER_COUNTS[name]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_registry_holds_exactly_the_paper_models():
    assert set(MODELS) == set(PAPER_COUNTS)


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="model_2fc"):
        make_model("model_5fc")


def test_seed_fixes_the_initial_weights():
    a, b = make_model("model_2conv2fc", seed=3), make_model("model_2conv2fc", seed=3)
    assert torch.equal(get_flat(a), get_flat(b))
    assert not torch.equal(get_flat(a), get_flat(make_model("model_2conv2fc", seed=4)))


def test_flat_vector_round_trips():
    model = make_model("model_2conv2fc", seed=0)
    theta = np.arange(n_params(model), dtype=np.float32) / 1e5
    set_flat(model, theta)
    assert np.array_equal(get_flat(model).numpy(), theta)
    with pytest.raises(ValueError, match="21840"):
        set_flat(model, theta[:-1])
