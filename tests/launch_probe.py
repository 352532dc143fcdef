"""The smallest Lightning run that shows how a launch came out: a one-weight module, its trainer config and data.
Used by tests/test_launch.py in-process and from the processes a launcher starts (which import this file)."""

import lightning as L
import torch
from omegaconf import OmegaConf


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, i):
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def probe_cfg(devices: int, strategy: str, num_threads: int | None = None):
    """A stage config with what build_trainer reads: `hardware` and a one-step `trainer`."""
    hw = {"accelerator": "cpu", "devices": devices, "num_nodes": 1, "strategy": strategy, "num_threads": num_threads,
          "cpu_heap": "keep"}
    return OmegaConf.create({"hardware": hw, "trainer": {
        "_target_": "lightning.pytorch.Trainer", "_partial_": True, "accelerator": "cpu", "devices": devices,
        "num_nodes": 1, "strategy": strategy, "max_steps": 1, "enable_progress_bar": False,
        "enable_checkpointing": False, "enable_model_summary": False}})


def ones(n: int = 8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(n, 1)), batch_size=2)
