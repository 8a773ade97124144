"""nvmlib.hf.SWAGCallback in real Hugging Face Trainer runs (CPU, a model built in code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from nvmlib import SWAG  # noqa: E402
from nvmlib.errors import ConfigError, InputError, PosteriorError  # noqa: E402
from nvmlib.hf import SWAGCallback  # noqa: E402

N, BATCH = 24, 4  # 6 batches per epoch


class Tiny(nn.Module):
    """A classifier returning its loss, as the Trainer expects of a model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 5, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(transformers.TrainerCallback):
    """The parameter vector after every optimizer step, recorded independently of the rule."""

    def __init__(self) -> None:
        self.vectors: list[np.ndarray] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.vectors.append(
            nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy().copy()
        )


def args(out: Path, epochs: int, **options) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        optim="sgd",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy=options.pop("save_strategy", "no"),
        seed=0,
        dataloader_num_workers=0,
        **options,
    )


def fit(
    out: Path, epochs: int, *callbacks, resume: str | None = None, **options
) -> transformers.Trainer:
    trainer = transformers.Trainer(
        model=Tiny(),
        args=args(out, epochs, **options),
        train_dataset=Data(),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("accumulate, collected", [(1, 4), (2, 2)])
def test_collects_by_the_rule_and_mean_equals_float64_reference(tmp_path, accumulate, collected):
    # every 3rd optimizer step from epoch 1: the last step of epoch 0 (state.epoch == 1.0) is in
    # epoch 0
    rec = Recorder()
    cb = SWAGCallback("mmap", tmp_path / "post", max_rank=20, start_epoch=1, every_n_steps=3)
    fit(tmp_path / "out", 3, rec, cb, gradient_accumulation_steps=accumulate)
    per_epoch = N // BATCH // accumulate
    assert len(rec.vectors) == 3 * per_epoch  # optimizer steps, not batches
    ref = np.array(
        [v for s, v in enumerate(rec.vectors, 1) if s % 3 == 0 and (s - 1) // per_epoch >= 1]
    )
    assert cb.swag.n_collected == len(ref) == collected
    np.testing.assert_allclose(cb.swag.posterior.mean(), ref.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cb.swag.posterior.kept_rows(), ref, rtol=1e-6, atol=1e-7)
    cb.swag.close()


def restored(trainer: transformers.Trainer) -> SWAGCallback:
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SWAGCallback)]
    return cb


def test_resume_from_a_checkpoint_equals_uninterrupted_run(tmp_path):
    whole = SWAGCallback("mmap", tmp_path / "whole", max_rank=20, every_n_steps=2)
    fit(tmp_path / "w", 3, whole)
    first = SWAGCallback("mmap", tmp_path / "post", max_rank=20, every_n_steps=2)
    fit(tmp_path / "out", 2, first, save_strategy="epoch")
    assert first.swag.n_collected == 6
    first.swag.close()
    trainer = fit(
        tmp_path / "out",
        3,
        SWAGCallback("mmap", tmp_path / "post", max_rank=20, every_n_steps=2),
        resume=str(tmp_path / "out" / "checkpoint-6"),
        restore_callback_states_from_checkpoint=True,
    )
    resumed = restored(trainer)
    assert resumed.swag.n_collected == whole.swag.n_collected == 9
    np.testing.assert_allclose(
        resumed.swag.posterior.mean(), whole.swag.posterior.mean(), rtol=1e-6, atol=1e-7
    )
    whole.swag.close()
    resumed.swag.close()


def test_resume_without_the_restored_count_is_refused(tmp_path):
    first = SWAGCallback("mmap", tmp_path / "post", max_rank=20)
    fit(tmp_path / "out", 1, first, save_strategy="epoch")
    first.swag.close()
    with pytest.raises(ConfigError, match="restore_callback_states_from_checkpoint=True"):
        fit(
            tmp_path / "out",
            2,
            SWAGCallback("mmap", tmp_path / "post", max_rank=20),
            resume=str(tmp_path / "out" / "checkpoint-6"),
        )


def test_every_n_steps_below_one_is_refused():
    with pytest.raises(InputError, match="every_n_steps=0"):
        SWAGCallback("mmap", "/nonexistent", every_n_steps=0)


def test_a_posterior_of_another_model_is_refused_before_training(tmp_path):
    SWAG(nn.Linear(3, 2), "mmap", tmp_path / "post", max_rank=20).close()
    rec = Recorder()
    with pytest.raises(PosteriorError, match="already holds a posterior"):
        fit(tmp_path / "out", 1, rec, SWAGCallback("mmap", tmp_path / "post", max_rank=20))
    assert rec.vectors == []  # no optimizer step ran
