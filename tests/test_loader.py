"""The teachers' DataLoader settings, and the first epoch saying when the loader bounds it."""

import logging
import time

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from mmdd.data.splits import loader_options
from mmdd.teachers.loader_watch import LoaderWatch


def test_loader_options_follow_the_data_config():
    data = OmegaConf.create({"num_workers": 3, "pin_memory": "auto", "persistent_workers": True, "prefetch_factor": 4})
    assert loader_options(data, on_gpu=True) == {"num_workers": 3, "pin_memory": True, "persistent_workers": True,
                                                 "prefetch_factor": 4}
    assert loader_options(data, on_gpu=False)["pin_memory"] is False
    # without workers torch refuses persistence and prefetching: left out
    assert loader_options(OmegaConf.merge(data, {"num_workers": 0}), on_gpu=False) == {"num_workers": 0,
                                                                                       "pin_memory": False}


class Slow(Dataset):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def __len__(self):
        return 96

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return torch.full((3,), float(i)), torch.zeros(1), i


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch, i):
        time.sleep(0.01)  # the model's step
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(seconds: float) -> LoaderWatch:
    watch = LoaderWatch(workers=0, skip=2, window=10)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[watch])
    trainer.fit(Tiny(), DataLoader(Slow(seconds), batch_size=4))
    return watch


@pytest.mark.parametrize("seconds, bound", [(0.02, True), (0.0, False)])
def test_the_first_epoch_says_when_waiting_for_batches_bounds_it(caplog, seconds, bound):
    with caplog.at_level(logging.INFO, logger="mmdd.teachers.loader_watch"):
        watch = fit(seconds)
    assert watch.report is not None and watch.report["workers"] == 0
    assert (watch.report["wait_share"] > 0.5) == bound  # 80 ms of loading against 10 ms of model per batch
    assert ("the data loader bounds this run, not the model" in caplog.text) == bound
    assert "teacher steps:" in caplog.text
