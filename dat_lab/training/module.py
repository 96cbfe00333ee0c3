"""The LightningModule: image classification with any DAT config, the paper's recipe as options.

Thin by design: the network is `self.model` (a plain `DAT`); the loss, optimizer, schedule,
Mixup/CutMix, EMA and metrics come from timm and torchmetrics. Metric names are `dat_lab.metrics`.
The whole model config is saved in the hyper-parameters, so a checkpoint rebuilds its model.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torchmetrics.classification import MulticlassAccuracy

from .. import metrics as M
from ..models import DAT, DATConfig, get_config, load_checkpoint


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


SCHEDULE_OPTIONS = ("lr", "weight_decay", "betas", "warmup_epochs", "warmup_lr", "min_lr")
"""What a resumed run keeps as saved (the optimizer's and the learning-rate schedule's state)."""
HYPER_FIELDS = ("drop_path_rate", "drop_rate", "attn_drop_rate")  # training options: weights fit either way
DATA_FIELDS = ("img_size", "in_chans")  # what the data set (the position tables' and the stem's shapes)


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """A model config's fields by name, the stages' as stages[i].field; sequences as lists (a saved
    config may hold tuples where a rebuilt one holds lists)."""
    fields = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            fields |= {f"{key}[{i}].{name}": x for i, stage in enumerate(value) for name, x in stage.items()}
        else:
            fields[key] = value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _differences(theirs: dict[str, Any], ours: dict[str, Any], ignore: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """The fields in which two model configs (as dicts) differ, and them listed in a line: the first
    four as "field X there, Y here", then how many more."""
    theirs, ours = _fields(theirs), _fields(ours)
    changed = [k for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k) and k not in ignore]
    listed = "; ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in changed[:4])
    return changed, listed + (f"; {len(changed) - 4} more" if len(changed) > 4 else "")


def weights_for(path: str, config: DATConfig) -> tuple[dict[str, torch.Tensor], int]:
    """The weights of the dat-lab checkpoint `path` for a model of `config` (without its head where the
    classes differ), and its number of classes; ValueError naming the fields where its model differs."""
    try:
        source = load_checkpoint(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"model.weights: {err}") from None
    changed, listed = _differences(source.config.to_dict(), config.to_dict(), ignore=("num_classes", *HYPER_FIELDS))
    if changed:
        data = [k for k in changed if k in DATA_FIELDS]
        give = " and ".join(
            ([f"--data options that give the same {' and '.join(data)}"] if data else [])
            + (["the variant and overrides it was made with"] if len(data) < len(changed) else []))
        raise ValueError(f"model.weights: {path} holds another model ({listed}); give {give}")
    same_head = source.config.num_classes == config.num_classes
    state = {k: v for k, v in source.state_dict().items() if same_head or not k.startswith("cls_head.")}
    return state, source.config.num_classes


def check_options(options: Any, rules: dict[str, tuple[Callable[[Any], Any], str]], prefix: str) -> None:
    """Raise a one-line ValueError naming the first of `options` (a mapping or Namespace) that breaks its
    rule ({name: (ok, what is allowed)}); a value not of the rule's type (text for a number) breaks it."""
    for name, (ok, allowed) in rules.items():
        if name not in options:
            continue
        value, kind = options[name], ""
        try:
            holds = not isinstance(value, bool) and bool(ok(value))
        except TypeError:  # text where a number belongs (a sweep override, budget.max_epochs=abc)
            holds, kind = False, "is not a number: it " if isinstance(value, str) else ""
        if not holds:
            raise ValueError(f"{prefix}.{name}: {value!r} {kind}must be {allowed}")


RECIPE_RULES = {  # ImageClassifier's training options: (ok, what is allowed)
    "lr": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
    "betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"), "warmup_lr": (lambda v: v >= 0, ">= 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"), "mixup": (lambda v: v >= 0, ">= 0 (0: off)"),
    "cutmix": (lambda v: v >= 0, ">= 0 (0: off)"), "mix_switch_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_decay": (lambda v: not v or 0 < v < 1, "in (0, 1), or null or 0 for no EMA")}


def check_recipe(**options: Any) -> None:
    """Raise a one-line ValueError naming the first training option of ImageClassifier out of its range
    (others given are not looked at)."""
    check_options(options, RECIPE_RULES, "model")
    if "lr" in options and options.get("min_lr", 0) > options["lr"]:  # the cosine would climb
        raise ValueError(f"model.min_lr: {options['min_lr']!r} must be <= model.lr ({options['lr']!r})")


class ImageClassifier(L.LightningModule):
    """Train a DAT variant (plus config overrides) as an image classifier.

    `num_classes`, `img_size` and `in_chans` come from the DataModule. `lr` is the peak learning
    rate of a per-step cosine schedule after a linear warmup of `warmup_epochs` from `warmup_lr`.

    Args:
        variant: a named model of dat_lab.models.VARIANTS (dat_pico, dat_nano, dat_tiny, dat_small,
            dat_base, dat_base_384)
        overrides: config fields to change, e.g. {offset_range: 4, groups: [1, 1, 3, 6]}: a stage
            field given once applies to every stage, a list gives one value per stage (README, "Models")
        num_classes: set from the data
        img_size: set from the data
        in_chans: set from the data
        lr: peak learning rate (AdamW through timm)
        weight_decay: AdamW's, not applied to the patterns of the model's no_weight_decay()
        betas: AdamW's
        warmup_epochs: linear warmup from warmup_lr to lr (fractions allowed), per step
        warmup_lr: learning rate at the warmup's first step
        min_lr: learning rate at the cosine's end
        mixup: Mixup alpha (0: off); timm's Mixup with a soft-target loss
        cutmix: CutMix alpha (0: off)
        mix_switch_prob: chance of CutMix instead of Mixup when both are on
        label_smoothing: of the targets, with or without Mixup
        ema_decay: keep an EMA of the weights with this decay, validated as val_ema/* (null: none)
        compile: torch.compile the inner model
        weights: start from the weights of a dat-lab checkpoint (`dat-lab convert` output, or a run's
            .ckpt) of the same model; a head of other classes is left new (fine-tuning)
        model_config: a whole model config; set by checkpoints, which rebuild their model from it
    """

    def __init__(self, *, variant: str = "dat_pico", overrides: dict[str, Any] | None = None,
                 num_classes: int = 10, img_size: int = 32, in_chans: int = 3,
                 lr: float = 5e-4, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_epochs: float = 0.0, warmup_lr: float = 5e-7, min_lr: float = 5e-6,
                 mixup: float = 0.0, cutmix: float = 0.0, mix_switch_prob: float = 0.5, label_smoothing: float = 0.0,
                 ema_decay: float | None = None, compile: bool = False, weights: str | None = None,
                 model_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_recipe(lr=lr, weight_decay=weight_decay, betas=betas, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
                     min_lr=min_lr, mixup=mixup, cutmix=cutmix, mix_switch_prob=mix_switch_prob,
                     label_smoothing=label_smoothing, ema_decay=ema_decay)
        if model_config is not None:  # rebuilding from a checkpoint
            config = DATConfig.from_dict(model_config)
        else:
            config = get_config(variant, **{**(overrides or {}), "num_classes": num_classes, "img_size": img_size,
                                            "in_chans": in_chans})
        self.save_hyperparameters(ignore=["model_config"])
        self.hparams["model_config"] = config.to_dict()
        self.model = DAT(config=config)
        if weights and model_config is None:  # (a checkpoint rebuilding its module brings its own weights)
            self._start_from(weights)
        self.mixup = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=mix_switch_prob,
                            label_smoothing=label_smoothing, num_classes=config.num_classes)
                      if mixup > 0 or cutmix > 0 else None)
        self.soft_loss = SoftTargetCrossEntropy()
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        top5 = min(5, config.num_classes)
        self.train_acc1 = MulticlassAccuracy(config.num_classes, top_k=1, average="micro")
        self.val_acc = torch.nn.ModuleDict({
            "acc1": MulticlassAccuracy(config.num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(config.num_classes, top_k=top5, average="micro"),
        })
        self.ema_acc = torch.nn.ModuleDict({k: m.clone() for k, m in self.val_acc.items()}) if self.ema else None

    @property
    def config(self) -> DATConfig:
        return self.model.config

    @property
    def example_input_array(self) -> torch.Tensor | None:
        """One image for Lightning's model summary (its sizes and FLOPs, else 0), in the weights' dtype (a
        "true" precision casts the weights, not this); none when compiling (it would compile for it)."""
        if self.hparams.compile:
            return None
        c = self.config
        return torch.zeros(1, c.in_chans, c.img_size, c.img_size, dtype=next(self.model.parameters()).dtype)

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.compile()  # the inner nn.Module, in place: state_dict names stay the same
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            loss = self.soft_loss(self(x), soft)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
            self.train_acc1(logits, y)
            self.log(M.TRAIN_ACC1, self.train_acc1, on_step=False, on_epoch=True)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, "
                                     f"step {self.global_step}: lower the learning rate or clip gradients")
        self.log(M.TRAIN_LOSS, loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)  # mean over ranks
        self.log(M.LR, self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def _evaluate(self, network: torch.nn.Module, batch, accuracies: torch.nn.ModuleDict, names: tuple[str, str],
                  loss_name: str | None) -> None:
        x, y = batch
        logits = network(x)
        if loss_name:
            self.log(loss_name, F.cross_entropy(logits, y), on_epoch=True, prog_bar=False, sync_dist=True)
        for (key, metric), name in zip(accuracies.items(), names):
            metric(logits, y)
            self.log(name, metric, on_epoch=True, prog_bar=key == "acc1")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(self.model, batch, self.val_acc, (M.VAL_ACC1, M.VAL_ACC5), M.VAL_LOSS)
        if self.ema is not None:
            self._evaluate(self.ema.module, batch, self.ema_acc, (M.VAL_EMA_ACC1, M.VAL_EMA_ACC5), None)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        optimizer = create_optimizer_v2(self.model, opt="adamw", lr=h.lr, weight_decay=h.weight_decay,
                                        betas=tuple(h.betas))
        trainer = self.trainer
        total = max(1, int(trainer.estimated_stepping_batches))  # the run's steps: max_epochs', or max_steps if fewer
        if trainer.max_epochs and trainer.max_epochs > 0:
            epochs = trainer.max_epochs  # (cut short by max_steps, the warmup shrinks alike)
        elif math.isfinite(trainer.num_training_batches):  # max_steps alone: warmup_epochs of an epoch's steps
            epochs = total / math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        else:  # (an epoch of unknown length)
            epochs = 1
        warmup = min(total - 1, int(h.warmup_epochs * total / epochs))
        scheduler = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=h.min_lr, warmup_t=warmup,
                                      warmup_lr_init=h.warmup_lr, warmup_prefix=True, t_in_epochs=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # Random states travel with the checkpoint, so a resumed run continues as the uninterrupted one.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}

    def _start_from(self, path: str) -> None:
        """Load `path`'s weights into the network (weights_for); a head of other classes stays as built,
        and is said so."""
        state, classes = weights_for(path, self.config)
        same_head = classes == self.config.num_classes
        self.model.load_state_dict(state, strict=same_head)  # every weight but another head's, by name and shape
        if not same_head and rank_zero_only.rank == 0:
            had = f"its head ({classes} classes) is not loaded" if classes else "it has no head"
            print(f"model.weights: {path}: {had}; this one ({self.config.num_classes} classes) starts new",
                  file=sys.stderr)

    def refuse_other_models(self, checkpoint: dict[str, Any], source: str = "the checkpoint") -> None:
        """A one-line ValueError, before any weight is loaded, when the checkpoint's weights do not fit
        this module (a run of another model config, e.g. the newest of a name that `--ckpt_path last`
        found), naming the config fields that differ (and `source`, the checkpoint)."""
        if "model_config" in checkpoint and "hyper_parameters" not in checkpoint:
            raise ValueError(f"--ckpt_path: {source} holds a model's weights alone (`dat-lab convert` output): start "
                             f"from them with --model.weights {source}; --ckpt_path takes a training run's checkpoint")
        if "hyper_parameters" not in checkpoint and "state_dict" not in checkpoint:  # the released code's
            raise ValueError(f"--ckpt_path: {source} is no training run's checkpoint (released weights?): convert it "
                             f"(`dat-lab convert {source} --variant NAME -o W.ckpt`), then start from it with "
                             "--model.weights W.ckpt")
        saved, here = checkpoint.get("state_dict", {}), self.state_dict()
        fits = saved.keys() == here.keys() and all(saved[k].shape == here[k].shape for k in here)
        config = checkpoint.get("hyper_parameters", {}).get("model_config")
        changed, listed = _differences(config or {}, self.hparams["model_config"]) if config or not fits else ([], "")
        if fits and not changed:  # an option that keeps the shapes (the offset range s, say) counts too
            return
        raise ValueError(f"--ckpt_path: {source} holds another model ({listed or 'other weights'}); give the "
                         "options it was trained with (its run's config.yaml), or start a new run")

    def refuse_changed_schedule(self, checkpoint: dict[str, Any], source: str = "the checkpoint") -> None:
        """A one-line ValueError where resuming `checkpoint` would keep its SCHEDULE_OPTIONS (restored with
        the optimizer and the schedule) over other values given now, which would be recorded but not used."""
        saved = checkpoint.get("hyper_parameters") or {}
        changed, listed = _differences({k: saved[k] for k in SCHEDULE_OPTIONS if k in saved},
                                       {k: self.hparams[k] for k in SCHEDULE_OPTIONS if k in saved})
        if changed:
            raise ValueError(f"--ckpt_path: resuming {source} restores its optimizer and learning-rate schedule, "
                             f"so other model options would not take effect ({listed}); resume with its values, or "
                             f"start a new run from its weights (--model.weights)")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.refuse_other_models(checkpoint)
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            version, internal, gauss = states["python"]
            random.setstate((version, tuple(internal), gauss))
            kind, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
