"""nvmlib.lightning.SWAGCallback in real Lightning runs (1 CPU process; DDP in
tests/test_ddp.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

lightning = pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

from nvmlib import SWAG  # noqa: E402
from nvmlib.errors import InputError, LockedError, PosteriorError  # noqa: E402
from nvmlib.lightning import SWAGCallback  # noqa: E402

N, BATCH = 24, 4  # 6 batches per epoch


class Tiny(pl.LightningModule):
    """A small classifier that records its parameter vector after every optimizer step itself
    (not through a callback), with its own step count and the epoch the step ran in."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.steps: list[tuple[int, int, np.ndarray]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        vec = nn.utils.parameters_to_vector(self.parameters()).detach().double().numpy().copy()
        self.steps.append((len(self.steps) + 1, self.current_epoch, vec))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    return DataLoader(
        TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=BATCH
    )


def trainer(epochs: int, *callbacks: pl.Callback, **options) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        **options,
    )


def expected(model: Tiny, every: int, start_epoch: int) -> np.ndarray:
    """The recorded vectors the rule selects: step count a multiple of `every`, epoch >=
    start_epoch."""
    return np.array(
        [v for step, epoch, v in model.steps if step % every == 0 and epoch >= start_epoch]
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_collects_by_the_rule_and_mean_equals_float64_reference(tmp_path, accumulate):
    pl.seed_everything(0)
    model = Tiny()
    cb = SWAGCallback("mmap", tmp_path / "post", max_rank=20, start_epoch=1, every_n_steps=2)
    trainer(3, cb, accumulate_grad_batches=accumulate).fit(model, data())
    ref = expected(model, 2, 1)
    assert len(model.steps) == 3 * 6 // accumulate  # optimizer steps, not batches
    assert cb.swag.n_collected == len(ref) == {1: 6, 2: 3}[accumulate]
    np.testing.assert_allclose(cb.swag.posterior.mean(), ref.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cb.swag.posterior.kept_rows(), ref, rtol=1e-6, atol=1e-7)
    probs = cb.swag.predict(data(), S=4, bn_loader=data())  # usable after fit
    assert probs.shape == (N, 3) and np.allclose(probs.sum(1), 1)
    cb.swag.close()


def test_resume_from_first_checkpoint_equals_uninterrupted_run(tmp_path):
    pl.seed_everything(0)
    whole = SWAGCallback("mmap", tmp_path / "whole", max_rank=20, every_n_steps=2)
    trainer(3, whole).fit(Tiny(), data())

    pl.seed_everything(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = SWAGCallback("mmap", tmp_path / "post", max_rank=20, every_n_steps=2)
    trainer(2, first, ckpt).fit(Tiny(), data())
    assert first.swag.n_collected == 6  # steps 2, 4, ..., 12
    first.swag.close()
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    assert len(epoch0) == 1

    resumed = SWAGCallback("mmap", tmp_path / "post", max_rank=20, every_n_steps=2)
    trainer(3, resumed).fit(Tiny(), data(), ckpt_path=epoch0[0])
    assert resumed.swag.n_collected == whole.swag.n_collected == 9
    np.testing.assert_allclose(
        resumed.swag.posterior.mean(), whole.swag.posterior.mean(), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        resumed.swag.posterior.kept_rows(), whole.swag.posterior.kept_rows(), rtol=1e-6, atol=1e-7
    )
    whole.swag.close()
    resumed.swag.close()


def test_resume_refuses_a_posterior_that_does_not_belong_to_the_checkpoint(tmp_path):
    pl.seed_everything(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    cb = SWAGCallback("mmap", tmp_path / "post", max_rank=20)
    trainer(1, cb, ckpt).fit(Tiny(), data())
    cb.swag.close()
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    SWAG(Tiny(), "mmap", tmp_path / "short", max_rank=20).close()  # the same model, but 0 iterates
    with pytest.raises(
        PosteriorError, match="counted 6 collected iterates, but the posterior at .* holds 0"
    ):
        trainer(2, SWAGCallback("mmap", tmp_path / "short", max_rank=20)).fit(
            Tiny(), data(), ckpt_path=checkpoint
        )
    other = SWAG(Tiny(hidden=9), "mmap", tmp_path / "other", max_rank=20)
    for _ in range(6):
        other.collect()
    other.close()
    with pytest.raises(PosteriorError, match="not 75: it belongs to another model"):
        trainer(2, SWAGCallback("mmap", tmp_path / "other", max_rank=20)).fit(
            Tiny(), data(), ckpt_path=checkpoint
        )


def test_every_n_steps_below_one_is_refused():
    with pytest.raises(InputError, match="every_n_steps=0: pass an integer >= 1"):
        SWAGCallback("mmap", "/nonexistent", every_n_steps=0)
    with pytest.raises(InputError, match="start_epoch=-1"):
        SWAGCallback("mmap", "/nonexistent", start_epoch=-1)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_a_posterior_of_another_model_is_refused_before_training(tmp_path):
    SWAG(Tiny(hidden=9), "mmap", tmp_path / "post", max_rank=20).close()
    before = snapshot(tmp_path / "post")
    model = Tiny()
    start = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    with pytest.raises(PosteriorError, match="already holds a posterior"):
        trainer(1, SWAGCallback("mmap", tmp_path / "post", max_rank=20)).fit(model, data())
    assert not model.steps and torch.equal(nn.utils.parameters_to_vector(model.parameters()), start)
    assert snapshot(tmp_path / "post") == before


def test_a_path_another_run_is_writing_is_refused_before_training(tmp_path):
    path = tmp_path / "post"
    code = (
        "import sys, time, torch; from nvmlib import SWAG; "
        f"s = SWAG(torch.nn.Linear(2, 2), 'mmap', {str(path)!r}, max_rank=4); "
        "s.collect(); s.flush(); "
        "print('open', flush=True); time.sleep(120)"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        before = snapshot(path)
        model = Tiny()
        with pytest.raises(LockedError, match=f"pid {writer.pid}"):
            trainer(1, SWAGCallback("mmap", path, max_rank=20, overwrite=True)).fit(model, data())
        assert not model.steps and snapshot(path) == before
    finally:
        writer.kill()
        writer.wait()
