"""Callbacks: throughput, offset statistics and sampling-point images for TensorBoard, and the
final metric in TensorBoard's hparams view."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from .. import metrics as M
from ..data import ImageDataModule
from ..figures import sampling_points_figure, stage_of
from ..models.geometry import offsets_in_cells


def _tensorboard(trainer: L.Trainer):
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class Throughput(L.Callback):
    """`train/images_per_sec`: images over the time spent in training steps, summed over devices."""

    def __init__(self) -> None:
        self.images, self.seconds = 0, 0.0  # (a run resumed mid-epoch starts with no on_train_epoch_start)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.images, self.seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seconds += time.perf_counter() - self.start
        self.images += len(batch[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds > 0:
            pl_module.log(M.THROUGHPUT, self.images / self.seconds * trainer.world_size, sync_dist=True)


class DeformableMonitor(L.Callback):
    """After each validation (and test): per deformable stage, the mean offset length in key-grid cells
    (scalar) and the offsets' histogram; every `every_n_epochs`, a figure of the keys sampled on a
    few validation images."""

    def __init__(self, *, every_n_epochs: int = 1, num_images: int = 4) -> None:
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.images: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.images is None and batch_idx == 0 and dataloader_idx == 0:
            # the validation set's first images, the same on every device (each device's first batch is another's:
            # the mean offset depended on how many trained); another data module's: its first batch's
            dataset = getattr(trainer.datamodule, "val_set", None) if isinstance(trainer.datamodule, ImageDataModule) else None
            if dataset is not None:
                images = torch.stack([dataset[i][0] for i in range(min(self.num_images, len(dataset)))])
            else:
                images = batch[0][: self.num_images]
            self.images = images.detach().to(batch[0].device, batch[0].dtype, copy=True)  # (bf16-true: bf16)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.images is None:
            return
        with torch.no_grad():
            out = pl_module.model.forward_intermediates(self.images.to(pl_module.device))
        if not out["deformable"]:
            return
        by_stage: dict[int, list[torch.Tensor]] = {}
        for name, info in out["deformable"].items():
            cells = offsets_in_cells(info["positions"], info["references"]).norm(dim=-1)
            by_stage.setdefault(stage_of(name), []).append(cells.flatten())
        writer = _tensorboard(trainer) if trainer.is_global_zero else None
        step = trainer.global_step
        for stage, values in by_stage.items():
            values = torch.cat(values).float()
            pl_module.log(M.offset_mean(stage), values.mean(), sync_dist=True)  # NaN if the weights are
            finite = values[torch.isfinite(values)]
            if writer is not None and finite.numel():
                writer.add_histogram(M.OFFSET_HISTOGRAM.format(stage=stage), finite.cpu(), step)
        if writer is not None and trainer.current_epoch % self.every_n_epochs == 0:
            data = trainer.datamodule
            fig = sampling_points_figure(self.images, out, mean=data.mean, std=data.std)
            writer.add_figure(M.SAMPLING_IMAGE, fig, step, close=True)

    # `test` evaluates the validation split too (there is no third split): the same record
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class MetricTracker(L.Callback):
    """The best and the last value of a logged metric over the run's validations, and the step the last
    was logged at, also put in `trainer.callback_metrics` (M.tracked), which Lightning brings back from
    the ranks of a spawned run (`results` reads them there)."""

    def __init__(self, *, metric: str = M.VAL_ACC1, direction: str = "maximize") -> None:
        self.metric, self.direction = metric, direction
        self.best: float | None = None
        self.last: float | None = None
        self.step: int | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.last = float(value)
        if self.best is None or (self.last > self.best if self.direction == "maximize" else self.last < self.best):
            self.best = self.last
        # the step Lightning's loggers log this validation's metrics at (its count of optimizer steps,
        # which it raises after an epoch's last validation; private: the global step, should it go)
        loop = trainer.fit_loop.epoch_loop
        self.step = loop._batches_that_stepped if hasattr(loop, "_batches_that_stepped") else trainer.global_step
        for which, kept in (("best", self.best), ("last", self.last), ("step", self.step)):
            trainer.callback_metrics[M.tracked(self.metric, which)] = torch.tensor(kept)

    def results(self, trainer: L.Trainer) -> tuple[float | None, float | None, int | None]:
        """(best, last, the step the last was logged at) of the run `trainer` ran, in this process or in
        spawned ranks."""
        if self.best is not None:
            return self.best, self.last, self.step
        best, last, step = (trainer.callback_metrics.get(M.tracked(self.metric, w)) for w in ("best", "last", "step"))
        if best is None or last is None:
            return None, None, None
        return float(best), float(last), int(step) if step is not None else None


class HparamsMetric(MetricTracker):
    """Write the run's hyper-parameters (the model's training options, the data's class, batch size and
    seed) to TensorBoard with the real best `val/acc1` (no -1 placeholder);
    kept in checkpoints, so that a resumed run's best counts the validations before it. (A sweep's
    MetricTracker keeps nothing there: a sweep never resumes a trial, and a run resumed from a trial's
    checkpoint has no MetricTracker, which Lightning would warn of.)"""

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "last": self.last, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.last, self.step = state_dict.get("best"), state_dict.get("last"), state_dict.get("step")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best is None:
            return
        params = {k: v for k, v in pl_module.hparams.items() if k != "model_config" and not k.startswith("_")}
        if (data := trainer.datamodule) is not None:  # what tells runs of one model apart: their data and seed
            params |= {"data": type(data).__name__, "data.batch_size": data.batch_size, "data.seed": data.seed}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics={M.HP_METRIC: self.best})
