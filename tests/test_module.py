"""nvmlib.SWAG on any nn.Module: exact moments, BatchNorm refresh, reopening, MultiSWAG, bad
input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from nvmlib import SWAG, MultiSWAG, open_store
from nvmlib.backends.base import Store
from nvmlib.errors import ConfigError, InputError, PosteriorError
from nvmlib.paper.any_model import Protocol, convnet, headline, run
from nvmlib.paper.data import Split
from nvmlib.paper.evaluate import evaluate

N = 96  # inputs in the test batch


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 28, 28, generator=gen), torch.randint(0, 10, (N,), generator=gen)


def _train(
    swag: SWAG, model: nn.Module, steps: int, x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """`steps` SGD steps, collecting after each; the collected vectors as float64 (steps, n)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = []
    for i in range(steps):
        idx = slice((i * 32) % N, (i * 32) % N + 32)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        swag.collect()
        seen.append(nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy())
    return np.array(seen)


def _trained(store: Store) -> tuple[SWAG, nn.Module, np.ndarray, torch.Tensor]:
    """A convnet with BatchNorm, 12 steps collected into a SWAG with max_rank 6."""
    torch.manual_seed(0)
    model = convnet(4)
    x, y = _data()
    swag = SWAG(model, store=store, max_rank=6, checkpoint_every=4)
    return swag, model, _train(swag, model, 12, x, y), x


@pytest.fixture(params=["dram", "mmap"])
def trained(request, tmp_path):
    with open_store(request.param, None if request.param == "dram" else tmp_path / "p") as store:
        swag, model, thetas, x = _trained(store)
        yield swag, model, thetas, x
        swag.close()


def test_moments_equal_float64_reference(store):
    """On every tier: mean, variance and kept rows of collected iterates, exactly."""
    swag, _, thetas, _ = _trained(store)
    assert swag.n_collected == 12 and swag.posterior.rank == 6
    np.testing.assert_allclose(swag.posterior.mean(), thetas.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(swag.posterior.variance(), thetas.var(0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(swag.posterior.kept_rows(), thetas[-6:].astype(np.float32))
    swag.close()


def test_batchnorm_statistics_equal_update_bn(trained):
    swag, model, _, x = trained
    loader = DataLoader(TensorDataset(x, torch.zeros(N)), batch_size=32)
    drawn = [copy.deepcopy(m) for m in swag.sample_models(3, bn_loader=loader, seed=5)]
    thetas = swag.sample(3, seed=5)
    for m, theta in zip(drawn, thetas, strict=True):
        ref = copy.deepcopy(model)
        nn.utils.vector_to_parameters(torch.from_numpy(theta), ref.parameters())
        update_bn(loader, ref)
        for a, b in zip(m.modules(), ref.modules(), strict=True):
            if isinstance(a, nn.BatchNorm2d):
                assert not a.training
                torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
                torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)
    # the wrapped model itself is untouched
    assert torch.equal(
        nn.utils.parameters_to_vector(model.parameters()).detach(),
        torch.from_numpy(trained[2][-1].astype(np.float32)),
    )


def test_loader_kinds_agree(trained):
    swag, _, _, x = trained
    pairs = DataLoader(TensorDataset(x, torch.zeros(N)), batch_size=40)
    inputs = DataLoader(x, batch_size=17)
    a = swag.predict(x, S=3, bn_loader=x, seed=2)
    b = swag.predict(pairs, S=3, bn_loader=x, seed=2)
    c = swag.predict(inputs, S=3, bn_loader=x, seed=2)
    assert a.shape == (N, 10) and a.dtype == np.float64
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_batchnorm_needs_a_loader_or_an_explicit_opt_out(trained):
    swag, _, _, x = trained
    with pytest.raises(ConfigError, match="bn_loader"):
        swag.sample_models(2)
    with pytest.raises(ConfigError, match="bn_loader"):
        swag.predict(x, S=2)
    stale = swag.predict(x, S=2, update_bn=False, seed=0)
    assert stale.shape == (N, 10)


def _state(swag: SWAG) -> tuple[int, np.ndarray, np.ndarray]:
    p = swag.posterior
    return p.n_collected, p.mean(), p.kept_rows()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda s, x: s.predict(x.flatten(1), S=2, bn_loader=x), ValueError, "shape"),
        (lambda s, x: s.predict(x, S=2, bn_loader=x[:, :, :5]), ValueError, "shape"),
        (lambda s, x: s.predict(x, S=2, bn_loader=[["not a tensor"]]), TypeError, "not a tensor"),
        (lambda s, x: s.predict(x, S=0, bn_loader=x), ValueError, "S=0"),
        (lambda s, x: s.sample(2, scale=-1.0), ValueError, "scale"),
        (lambda s, x: s.sample(2, scale=float("nan")), ValueError, "scale"),
        (lambda s, x: s.predict(x[:0], S=2, bn_loader=x), ValueError, "no batches"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(trained, bad, error, match):
    swag, _, _, x = trained
    before = _state(swag)
    with pytest.raises(error, match=match):
        bad(swag, x)
    after = _state(swag)
    assert (
        before[0] == after[0]
        and np.array_equal(before[1], after[1])
        and np.array_equal(before[2], after[2])
    )
    assert swag.predict(x, S=2, bn_loader=x, seed=0).shape == (N, 10)  # still usable afterwards


def test_nan_parameters_are_refused_and_change_nothing(tmp_path):
    model = convnet(4)
    with SWAG(model, "mmap", tmp_path / "p", max_rank=4) as swag:
        swag.collect()
        before = swag.posterior.mean()
        with torch.no_grad():
            next(model.parameters())[0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            swag.collect()
        assert swag.n_collected == 1 and np.array_equal(swag.posterior.mean(), before)


def test_bfloat16_model_is_collected_exactly():
    model = nn.Linear(8, 4).to(torch.bfloat16)
    with SWAG(model, max_rank=4) as swag:
        swag.collect()
        widened = nn.utils.parameters_to_vector(model.parameters()).detach().float().numpy()
        np.testing.assert_array_equal(swag.posterior.kept_rows()[0], widened)


def test_non_floating_parameter_is_refused():
    model = nn.Linear(3, 2)
    model.steps = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="steps"):
        SWAG(model, max_rank=4)


def test_other_model_is_refused(tmp_path):
    torch.manual_seed(0)
    with SWAG(nn.Linear(4, 6), "mmap", tmp_path / "p", max_rank=4) as swag:
        swag.collect()
        swag.collect()
    with pytest.raises(PosteriorError, match="parameters"):
        SWAG.open(nn.Linear(5, 6), "mmap", tmp_path / "p")
    with pytest.raises(
        PosteriorError, match="architecture"
    ):  # the same 30 parameters, other shapes
        SWAG.open(nn.Linear(5, 5), "mmap", tmp_path / "p")
    with SWAG.open(nn.Linear(4, 6), "mmap", tmp_path / "p", readonly=True) as again:
        assert again.n_collected == 2
        with pytest.raises(PosteriorError, match="read-only"):
            again.collect()


def test_reopen_in_new_process_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = convnet(4)
    x, y = _data()
    with SWAG(model, "mmap", tmp_path / "p", max_rank=5) as swag:
        _train(swag, model, 7, x, y)
        here = swag.predict(x, S=4, bn_loader=x, seed=11)
    torch.save({"model": model.state_dict(), "x": x}, tmp_path / "inputs.pt")
    code = f"""
import numpy as np, torch
from nvmlib import SWAG
from nvmlib.paper.any_model import convnet
saved = torch.load({str(tmp_path / "inputs.pt")!r})
model = convnet(4)
model.load_state_dict(saved["model"])
with SWAG.open(model, "mmap", {str(tmp_path / "p")!r}, readonly=True) as swag:
    there = swag.predict(saved["x"], S=4, bn_loader=saved["x"], seed=11)
    np.save({str(tmp_path / "there.npy")!r}, there)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert np.array_equal(np.load(tmp_path / "there.npy"), here)


def test_multiswag_runs_side_by_side(tmp_path):
    x, y = _data()
    models = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        models.append(convnet(4))
    multi = MultiSWAG.create(models, "mmap", tmp_path / "multi", max_rank=4)
    with multi:
        for swag, model in zip(multi.runs, models, strict=True):
            _train(swag, model, 5, x, y)
        per_run = multi.predict_runs(x, S=3, bn_loader=x, seed=7)
        combined = multi.predict(x, S=3, bn_loader=x, seed=7)
    assert len(per_run) == 3 and sorted(p.name for p in (tmp_path / "multi").iterdir()) == [
        "run0",
        "run1",
        "run2",
    ]
    np.testing.assert_allclose(combined, np.mean(per_run, axis=0), atol=0)
    assert not np.allclose(per_run[0], per_run[1])  # independent runs
    with MultiSWAG.open(convnet(4), "mmap", tmp_path / "multi") as again:
        assert len(again) == 3
        np.testing.assert_array_equal(again.predict(x, S=3, bn_loader=x, seed=7), combined)
    with pytest.raises(PosteriorError, match="no MultiSWAG runs"):
        MultiSWAG.open(convnet(4), "mmap", tmp_path)
    with pytest.raises(ConfigError, match="architecture"):
        MultiSWAG.create([convnet(4), convnet(8)], "dram")


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the pinned-buffer path runs on a GPU only",
)
def test_cuda_collection_matches_cpu(tmp_path):
    torch.manual_seed(0)
    cpu_model = convnet(4)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x, y = _data()
    with (
        SWAG(cpu_model, "mmap", tmp_path / "cpu", max_rank=6, checkpoint_every=3) as a,
        SWAG(gpu_model, "mmap", tmp_path / "gpu", max_rank=6, checkpoint_every=3) as b,
    ):
        for swag in (a, b):
            m = cpu_model if swag is a else gpu_model
            for _ in range(10):
                with torch.no_grad():
                    for p in m.parameters():
                        p.mul_(0.99).add_(0.01)
                swag.collect()
        assert a.n_collected == b.n_collected == 10
        np.testing.assert_allclose(a.posterior.mean(), b.posterior.mean(), atol=1e-6)
        np.testing.assert_array_equal(a.posterior.kept_rows(), b.posterior.kept_rows())


def test_swag_and_multiswag_beat_sgd_at_small_scale():
    """The any_model notebook's claim, at a fixed seed and a size that runs in seconds."""
    out = run(
        Protocol(
            dataset="fashion",
            limit=2000,
            test_limit=2000,
            width=8,
            epochs=6,
            swag_epochs=3,
            runs=2,
            samples=8,
            bn_examples=1000,
        )
    )
    table = headline(out["metrics"])
    for method in ("SWAG", "MultiSWAG"):
        assert table.loc[method, "nll"] < table.loc["SGD", "nll"], table
        assert table.loc[method, "ece"] < table.loc["SGD", "ece"], table
    assert (out["cost"].collects == 3 * 3).all()  # 16 minibatches an epoch: 3 collects × 3 epochs
    json.dumps(out["metrics"].to_dict(orient="records"))  # the notebook's record is JSON-ready


# ---- mixed precision: each parameter in its own dtype -------------------------------------------
class Mixed(nn.Module):
    """A layer in `low` feeding a layer in `high`; forward casts between them, as such models do."""

    def __init__(self, low: torch.dtype, high: torch.dtype) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5).to(low), nn.Linear(5, 3).to(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x.to(self.a.weight.dtype)).to(self.b.weight.dtype))


@pytest.mark.parametrize(
    "low, high", [(torch.float16, torch.float32), (torch.float32, torch.float64)]
)
def test_mixed_precision_model_keeps_each_parameter_dtype(low, high):
    torch.manual_seed(0)
    model = Mixed(low, high)
    exact = [p.detach().clone() for p in model.parameters()]
    with SWAG(model, max_rank=4) as swag:
        swag.collect()
        assert swag.posterior.dtype == np.dtype(
            str(high).removeprefix("torch.")
        )  # the widest parameter dtype
        widened = torch.cat([p.reshape(-1).to(high) for p in exact]).numpy()
        np.testing.assert_array_equal(
            swag.posterior.kept_rows()[0], widened
        )  # nothing rounded to `low`
        mean = swag.mean_model()
        for p, q in zip(mean.parameters(), exact, strict=True):
            assert p.dtype == q.dtype and torch.equal(p, q)  # bit-exact mean of one iterate
        for drawn in swag.sample_models(2, seed=0):
            assert [p.dtype for p in drawn.parameters()] == [q.dtype for q in exact]
        x = torch.randn(7, 6)
        assert swag.predict(x, S=2).shape == (7, 3)
        with pytest.raises(
            ValueError, match="loader"
        ):  # a genuine loader problem still names the loader
            swag.predict(torch.randn(7, 4), S=2)


# ---- bn_loader: empty, one-shot, or empty on a later pass ---------------------------------------
class Once:
    """An iterable that yields its batches on the first pass only (a stream that ran dry)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.passes = x, 0

    def __iter__(self):
        self.passes += 1
        return iter([self.x] if self.passes == 1 else [])


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


BAD_BN_LOADERS = [  # (make one from the inputs x, what the refusal says)
    (lambda x: [], "bn_loader yielded no batches"),
    (lambda x: x[:0], "bn_loader yielded no batches"),
    (lambda x: DataLoader(TensorDataset(x[:0]), batch_size=8), "bn_loader yielded no batches"),
    (lambda x: (b for b in [x]), "bn_loader is a one-shot iterator"),
    (
        lambda x: iter(DataLoader(TensorDataset(x), batch_size=32)),
        "bn_loader is a one-shot iterator",
    ),
    (
        lambda x: Once(x),
        "bn_loader yielded no batches",
    ),  # the first model's pass works, the second's is empty
]


def test_bad_bn_loader_is_refused_and_changes_nothing(trained):
    swag, model, _, x = trained
    before, buffers = _state(swag), _bn_state(model)
    for bad, match in BAD_BN_LOADERS:
        with pytest.raises(InputError, match=match):
            swag.predict(x, S=3, bn_loader=bad(x), seed=0)
        with pytest.raises(InputError, match=match):
            list(swag.sample_models(3, bn_loader=bad(x), seed=0))
    with pytest.raises(InputError, match="bn_loader yielded no batches"):
        swag.mean_model(bn_loader=[])
    after = _state(swag)
    assert (
        before[0] == after[0]
        and np.array_equal(before[1], after[1])
        and np.array_equal(before[2], after[2])
    )
    assert all(torch.equal(a, b) for a, b in zip(buffers, _bn_state(model), strict=True))
    assert swag.predict(x, S=2, bn_loader=x, seed=0).shape == (N, 10)  # still usable afterwards


def test_one_shot_loader_is_refused(trained):
    swag, _, _, x = trained
    with pytest.raises(
        InputError, match="loader is a one-shot iterator.*DataLoader or a list/tensor"
    ):
        swag.predict((b for b in [x]), S=2, bn_loader=x)


# ---- sample_models gives distinct models ---------------------------------------------------------
def test_sample_models_gives_distinct_models(trained):
    swag, model, _, x = trained
    drawn = list(swag.sample_models(3, bn_loader=x, seed=4))
    thetas = swag.sample(3, seed=4)
    assert len({id(m) for m in drawn}) == 3 and all(m is not model for m in drawn)
    vectors = [nn.utils.parameters_to_vector(m.parameters()).detach().numpy() for m in drawn]
    for v, theta in zip(vectors, thetas, strict=True):
        np.testing.assert_array_equal(v, theta)
    assert not np.array_equal(vectors[0], vectors[1]) and not np.array_equal(vectors[1], vectors[2])
    assert not torch.equal(
        drawn[0][1].running_mean, drawn[1][1].running_mean
    )  # each its own BatchNorm statistics
    mean = swag.mean_model(bn_loader=x)
    kept = nn.utils.parameters_to_vector(mean.parameters()).detach().clone()
    swag.predict(x, S=2, bn_loader=x, seed=0)  # predict's working copy is not the mean model
    assert torch.equal(nn.utils.parameters_to_vector(mean.parameters()).detach(), kept)


# ---- (S, scale): one check, the same message at every layer --------------------------------------
def _split(x: torch.Tensor) -> Split:
    images = (x[:, 0].clamp(-3, 3) * 40 + 128).to(torch.uint8).numpy()
    return Split("mnist", "test", images, np.arange(len(images)) % 10, "generated", True)


def _callers(swag: SWAG, model: nn.Module, x: torch.Tensor, multi: MultiSWAG) -> dict:
    return {
        "SWAGPosterior.sample": lambda S, scale: swag.posterior.sample(S, scale=scale, seed=0),
        "SWAG.sample": lambda S, scale: swag.sample(S, scale, seed=0),
        "SWAG.sample_models": lambda S, scale: list(swag.sample_models(S, x, scale, seed=0)),
        "SWAG.predict": lambda S, scale: swag.predict(x, S, x, scale, seed=0),
        "MultiSWAG.predict": lambda S, scale: multi.predict(x, S, x, scale, seed=0),
        "evaluate": lambda S, scale: evaluate(
            model, swag.posterior, _split(x), samples=S, scale=scale, angles=(0,)
        ),
    }


BAD_SAMPLING = [  # (S, scale, how the message starts)
    (2, float("nan"), "scale=nan:"),
    (2, -1.0, "scale=-1.0:"),
    (2, float("inf"), "scale=inf:"),
    (2, True, "scale=True:"),
    (2, np.bool_(True), "scale=np.True_:"),
    (2, "0.5", "scale='0.5':"),
    (0, 0.5, "S=0:"),
    (True, 0.5, "S=True:"),
    (2.0, 0.5, "S=2.0:"),
]


def test_bad_sampling_arguments_get_one_message_at_every_layer(trained):
    swag, model, _, x = trained
    multi = MultiSWAG([swag])
    before = _state(swag)
    for S, scale, named in BAD_SAMPLING:
        messages = set()
        for call in _callers(swag, model, x, multi).values():
            with pytest.raises(InputError) as info:
                call(S, scale)
            messages.add(str(info.value))
        assert len(messages) == 1 and messages.pop().startswith(named), messages
    after = _state(swag)
    assert (
        before[0] == after[0]
        and np.array_equal(before[1], after[1])
        and np.array_equal(before[2], after[2])
    )


def test_numpy_scalars_are_accepted_at_every_layer(trained):
    swag, model, _, x = trained
    multi = MultiSWAG([swag])
    for name, call in _callers(swag, model, x, multi).items():
        a, b = call(np.int64(2), np.float32(0.5)), call(2, 0.5)
        if name == "evaluate":
            assert a.samples == 2 and type(a.samples) is int and type(a.scale) is float
            json.dumps(a.to_dict())
            a, b = a.metrics, b.metrics
        elif name == "SWAG.sample_models":
            a, b = (
                [nn.utils.parameters_to_vector(m.parameters()).detach().numpy() for m in ms]
                for ms in (a, b)
            )
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
