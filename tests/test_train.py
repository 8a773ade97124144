"""Training records the posterior the paper describes, checks its inputs first, and resumes
exactly."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nvmlib.backends import open_store
from nvmlib.errors import ConfigError, DataError, PosteriorError, StoreError
from nvmlib.paper.models import get_flat
from nvmlib.paper.train import STATE_FILE, TrainConfig, epoch_order, load_state, reopen, train
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.log import LOG

PAPER_ROWS = [
    "posterior size (byte)",
    "train data loading time (s)",
    "test data loading time (s)",
    "open shelf time (s)",
    "make model time (s)",
    "make posterior time (s)",
    "epoch 1 time (s)",
    "epoch 2 time (s)",
    "posterior finalize time (s)",
    "total experiment time (s)",
    "total script time (s)",
]


def small(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            "model": "model_2conv2fc",
            "epochs": 2,
            "limit": 500,
            "lr": 0.05,
            "progress": False,
            **kw,
        }
    )


def test_mmap_run_writes_the_paper_rows_and_a_reopenable_posterior(tmp_path):
    csv = tmp_path / "out" / "run.csv"
    cfg = small(
        backend="mmap",
        posterior_path=str(tmp_path / "post"),
        results_filepath=str(csv),
        record_every=2,
    )
    result = train(cfg)
    final = get_flat(result.model).numpy()
    assert result.posterior.n_collected == 1 + 2 * math.ceil(
        5 / 2
    )  # initial + ceil(batches / r) per epoch
    result.close()
    table = pd.read_csv(csv, index_col=0)["value"]
    assert list(table.index) == PAPER_ROWS and (table > 0).all()
    record = json.loads(csv.with_suffix(".json").read_text())
    assert record["config"]["record_every"] == 2 and record["tier"]["kind"] == "mmap"
    assert record["data"]["train"]["verified"] and {"torch", "numpy", "nvmlib"} <= set(
        record["versions"]
    )
    post = SWAGPosterior.open(
        open_store("mmap", tmp_path / "post"), model="model_2conv2fc", readonly=True
    )
    assert post.n_collected == 7 and post.nbytes == table["posterior size (byte)"]
    post2, model, store = reopen("mmap", tmp_path / "post")
    assert np.array_equal(get_flat(model).numpy(), final) and np.array_equal(
        post2.mean(), post.mean()
    )
    store.close()


def test_same_seed_same_run_on_dram_and_mmap(tmp_path):
    a = train(small(max_rank=4))
    b = train(small(max_rank=4, backend="mmap", posterior_path=str(tmp_path)))
    assert np.array_equal(a.posterior.mean(), b.posterior.mean())
    assert np.array_equal(a.posterior.variance(), b.posterior.variance())
    assert a.posterior.rank == 4
    a.close(), b.close()


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(1, 3, 100), epoch_order(1, 3, 100))
    assert not torch.equal(epoch_order(1, 3, 100), epoch_order(1, 4, 100))
    assert not torch.equal(epoch_order(1, 3, 100), epoch_order(2, 3, 100))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("max_rank, codec", [(None, None), (6, None), (6, "delta-zstd")])
def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, max_rank, codec):
    whole = train(
        small(
            backend="mmap",
            posterior_path=str(tmp_path / "whole"),
            checkpoint_every=3,
            max_rank=max_rank,
            codec=codec,
        )
    )

    def stop_in_second_epoch(epoch: int, batch: int) -> None:
        if epoch == 1 and batch == 2:  # 9 updates made; the last checkpoint was at 7
            raise Interrupt

    cut = small(
        backend="mmap",
        posterior_path=str(tmp_path / "cut"),
        checkpoint_every=3,
        max_rank=max_rank,
        codec=codec,
    )
    with pytest.raises(Interrupt):
        train(cut, on_batch=stop_in_second_epoch)
    state = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)
    assert (state["epoch"], state["batch"], state["updates"]) == (1, 1, 7) and not state["finished"]
    resumed = train(TrainConfig(**{**cut.__dict__, "resume": True}))
    assert resumed.record["resumed_from_update"] == 7
    assert resumed.posterior.n_collected == whole.posterior.n_collected == 11
    assert np.array_equal(resumed.posterior.mean(), whole.posterior.mean())
    assert np.array_equal(resumed.posterior.variance(), whole.posterior.variance())
    assert np.array_equal(resumed.posterior.sample(3, seed=1), whole.posterior.sample(3, seed=1))
    assert torch.equal(get_flat(resumed.model), get_flat(whole.model))
    assert resumed.posterior.kept_rows().tobytes() == whole.posterior.kept_rows().tobytes()
    assert (
        resumed.timings["posterior size (byte)"] == resumed.posterior.stored_bytes
    )  # bytes on the disk
    store = resumed.posterior.store  # a compressed log occupies its records; raw rows, every slot
    assert (store.occupied(LOG) < store.nbytes(LOG)) == (codec is not None)
    whole.close(), resumed.close()


def test_resume_after_the_newest_checkpoint_was_lost_takes_the_state_before(tmp_path):
    """A power loss while the newest checkpoint is written behind training leaves the posterior
    at the one before: --resume then takes the train state saved with that one."""
    whole = train(small(backend="mmap", posterior_path=str(tmp_path / "whole"), checkpoint_every=3))
    cut = small(backend="mmap", posterior_path=str(tmp_path / "cut"), checkpoint_every=3)

    def stop(epoch: int, batch: int) -> None:
        if epoch == 1 and batch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cut, on_batch=stop)
    with open_store("mmap", tmp_path / "cut") as store:  # as if checkpoint 7 never landed
        with SWAGPosterior.open(store) as post:
            post.truncate(4)
    resumed = train(TrainConfig(**{**cut.__dict__, "resume": True}))
    assert resumed.record["resumed_from_update"] == 4
    assert np.array_equal(resumed.posterior.mean(), whole.posterior.mean())
    assert np.array_equal(resumed.posterior.variance(), whole.posterior.variance())
    assert torch.equal(get_flat(resumed.model), get_flat(whole.model))
    whole.close(), resumed.close()


def test_resume_refuses_changed_settings_and_dram(tmp_path):
    train(small(backend="mmap", posterior_path=str(tmp_path), epochs=1)).close()
    with pytest.raises(ConfigError, match="lr"):
        train(small(backend="mmap", posterior_path=str(tmp_path), epochs=1, lr=0.1, resume=True))
    with pytest.raises(ConfigError, match="dram"):
        train(small(resume=True))


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"model": "model_5fc"}, ConfigError, "unknown model"),
        ({"data_path": "/nonexistent/mnist"}, DataError, "does not exist"),
        ({"gpu": 64}, ConfigError, "GPU 64"),
        ({"epochs": 10**7}, StoreError, "needs .* GB"),
        ({"backend": "mmap", "shelf_size_mb": 10}, ConfigError, "-s applies to shelf tiers"),
        ({"swag_start": 2}, ConfigError, "swag_start"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, change, error, match):
    calls = []
    cfg = small(posterior_path=str(tmp_path / "p") if change.get("backend") else None, **change)
    with pytest.raises(error, match=match):
        train(cfg, on_batch=lambda e, b: calls.append(b))
    assert calls == []


def test_unwritable_results_path_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        train(small(results_filepath=str(tmp_path / "file" / "run.csv")))
    with pytest.raises(ConfigError, match="is a directory"):
        train(small(results_filepath=str(tmp_path)))


def test_too_small_mmap_tier_names_the_size(tmp_path):
    with pytest.raises(StoreError, match=r"needs \d+\.\d+ GB but mmap tier"):
        train(
            small(
                model="model_4fc",
                epochs=10**5,
                limit=None,
                backend="mmap",
                posterior_path=str(tmp_path),
            )
        )
    assert not (tmp_path / "swag.log.npy").exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x02(.", b"PK\x03\x04 not a zip", b"\x80\x02}q\x00."],
    ids=["empty", "unpickler-pops-an-empty-stack", "not-a-zip", "a-dict-without-format"],
)
def test_a_damaged_train_state_is_a_posterior_error_that_names_it(tmp_path, content):
    """Bytes that are not a train state, including those on which torch's weights-only
    unpickler raises IndexError (about 6% of random bytes), are refused as damaged."""
    path = tmp_path / STATE_FILE
    path.write_bytes(content)
    with pytest.raises(PosteriorError, match="is damaged"):
        load_state(path)
