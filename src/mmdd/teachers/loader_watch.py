"""Whether the data loader, not the model, bounds a teacher's epoch: measured in the run itself.

The teachers' batches are decoded, cropped and RandAugment-ed image by image in the loader's workers; on a fast GPU
that can take longer than the step. Lightning fetches the next batch between one step's end and the next step's
start, so that gap is the time the GPU waited for data. After `skip` steps (workers starting), over the next
`window` steps of the first epoch, LoaderWatch logs the rates (images/s the steps could take, images/s the run got)
and warns when the waits take more than `threshold` of the time, with what to change.
"""

from __future__ import annotations

import logging
import os
import time

import lightning as L

log = logging.getLogger(__name__)


class LoaderWatch(L.Callback):
    def __init__(self, workers: int, skip: int = 3, window: int = 20, threshold: float = 0.25):
        self.workers, self.skip, self.window, self.threshold = workers, skip, window, threshold
        self.steps, self.waited, self.computed, self.images = 0, 0.0, 0.0, 0
        self._end = self._start = None
        self.report: dict | None = None  # the measurement, once made

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.report is not None:
            return  # measured: no more synchronising
        self._start = time.perf_counter()
        if self._end is not None and self.steps >= self.skip:
            self.waited += self._start - self._end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.report is not None:
            return
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize(pl_module.device)  # the step's real end (only while measuring)
        self._end = time.perf_counter()
        if self.steps >= self.skip:
            self.computed += self._end - self._start
            self.images += len(batch[0]) * trainer.world_size
        self.steps += 1
        if self.report is None and self.steps == self.skip + self.window:
            self._say()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.report is None and self.steps > self.skip:  # an epoch shorter than the window
            self._say()

    def _say(self) -> None:
        total = self.waited + self.computed
        if total <= 0:
            return
        share = self.waited / total
        self.report = {"wait_share": share, "images_per_s": self.images / total,
                       "model_images_per_s": self.images / max(self.computed, 1e-9), "workers": self.workers}
        log.info("teacher steps: %.0f images/s; the model alone could take %.0f images/s (%d loader workers, %.0f%% "
                 "of the time waiting for batches)", self.report["images_per_s"], self.report["model_images_per_s"],
                 self.workers, 100 * share)
        if share > self.threshold:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:
                cores = os.cpu_count() or 1
            log.warning("the data loader bounds this run, not the model: %.0f%% of each teacher step waits for the next "
                        "batch (%.0f images/s from %d workers, the model could take %.0f). More workers "
                        "(data.num_workers; this process may use %d cores), data.augment.crop_from=decoded (crops from "
                        "the decode cache), or fewer augmentation ops would feed it faster", 100 * share,
                        self.report["images_per_s"], self.workers, self.report["model_images_per_s"], cores)
