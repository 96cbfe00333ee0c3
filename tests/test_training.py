"""Training through `dat-lab train` (LightningCLI) on the CPU: small, real runs."""

import inspect
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_summary import ModelSummary
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

import cli
import dat_lab
from dat_lab import metrics as M
from dat_lab.data import (CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, ImageFolderDataModule,
                          SyntheticDataModule)
from dat_lab.training import ImageClassifier, NonFiniteLossError
from dat_lab.training.cli import default_callbacks, main as train
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits_quick.yaml")


def _run(tmp_path, *args):
    return train(["fit", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false", *args])


def _scalars(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("variant", ["dat_pico", "dat_nano", "dat_tiny"])
def test_fast_dev_run_on_synthetic_data(tmp_path, variant):
    cli_obj = _run(tmp_path, "--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--data.batch_size",
                   "4", "--model.variant", variant, "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu")
    assert cli_obj.trainer.global_step == 1 and M.VAL_ACC1 in cli_obj.trainer.callback_metrics  # a step, a validation
    assert not list(tmp_path.rglob("*.ckpt"))  # a smoke run leaves no checkpoint (Lightning 2.6 wrote last.ckpt)


def test_digits_run_learns_and_logs_what_deformable_attention_does(tmp_path):
    cli_obj = _run(tmp_path, "--config", DIGITS, "--trainer.max_epochs", "4", "--name", "digits")
    run = tmp_path / "digits" / "version_0"
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert list((run / "checkpoints").glob("best-epoch*.ckpt"))
    assert cli_obj.trainer.callback_metrics[M.VAL_ACC1] >= 0.90
    events = _scalars(run)
    tags = events.Tags()
    for tag in (M.offset_mean(2), M.offset_mean(3), M.VAL_ACC1, M.VAL_ACC5, M.VAL_LOSS, M.TRAIN_LOSS + "_step",
                M.LR, M.THROUGHPUT, M.HP_METRIC):
        assert tag in tags["scalars"], tag
    assert M.SAMPLING_IMAGE in tags["images"] and M.OFFSET_HISTOGRAM.format(stage=2) in tags["histograms"]
    assert events.Scalars(M.HP_METRIC)[-1].value == pytest.approx(max(e.value for e in events.Scalars(M.VAL_ACC1)))
    assert all(e.value > 0 for e in events.Scalars(M.offset_mean(2)))
    hparams = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    shown = dict(hparams.session_start_info.hparams)  # TensorBoard's HPARAMS view: no internals, the data's seed
    assert {"lr", "variant", "data", "data.batch_size", "data.seed"} <= shown.keys() and not [k for k in shown if k[0] == "_"]
    assert (shown["data"].string_value, shown["data.seed"].number_value) == ("DigitsDataModule", 0)
    # the checkpoint rebuilds its model from the config it carries
    model = dat_lab.load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.config == cli_obj.model.config and model.config.in_chans == 1
    again = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    # `test` of it records the offsets as validate does (the same split), into a version of its own
    train(["test", "--config", DIGITS, "--name", "digits", "--trainer.default_root_dir", str(tmp_path),
           "--trainer.enable_progress_bar", "false", "--ckpt_path", "last"])
    tested = _scalars(tmp_path / "digits" / "version_1").Tags()
    assert M.offset_mean(2) in tested["scalars"] and M.SAMPLING_IMAGE in tested["images"]


def test_cpu_run_is_repeatable(tmp_path):
    args = ["--config", DIGITS, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6"]
    first = _run(tmp_path / "a", *args).trainer.callback_metrics
    second = _run(tmp_path / "b", *args).trainer.callback_metrics
    assert float(first[M.VAL_LOSS]) == float(second[M.VAL_LOSS])
    assert float(first[M.TRAIN_LOSS + "_epoch"]) == float(second[M.TRAIN_LOSS + "_epoch"])


def test_the_model_summary_counts_an_images_flops():
    """Lightning's summary runs one image through the model (else it shows 0 FLOPs and no sizes);
    not when compiling (the compiled model would be traced for a batch of one first)."""
    module = ImageClassifier(variant="dat_pico", num_classes=10, img_size=32, in_chans=1)
    summary = ModelSummary(module, max_depth=1)
    assert summary.total_flops > 0 and summary.in_sizes[0] == [1, 1, 32, 32] and summary.out_sizes[0] == [1, 10]
    assert ImageClassifier(variant="dat_pico", compile=True).example_input_array is None
    assert module.to(torch.bfloat16).example_input_array.dtype == torch.bfloat16  # as bf16-true casts the weights


def test_a_true_precision_run_starts_with_its_model_summary(tmp_path, capsys):
    """The summary's image is in the weights' dtype (a float32 image into bf16 weights failed the run)."""
    train(["fit", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
           "--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--data.batch_size", "4",
           "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-true"])
    flops = re.search(r"Total FLOPs: ([\d.]+) M", capsys.readouterr().out)
    assert flops and float(flops.group(1)) > 0


def test_last_ckpt_is_the_last_epoch_when_the_best_was_earlier(tmp_path):
    """An accuracy that does not improve (a learning rate of nothing): the best checkpoint is epoch 0's,
    last.ckpt the last epoch's (it stayed epoch 0's: Lightning's save_last follows the best's saves)."""
    _run(tmp_path, "--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--data.batch_size", "4",
         "--model.lr", "1e-12", "--model.min_lr", "0", "--model.warmup_epochs", "0", "--trainer.max_epochs", "3",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
         "--name", "flat")
    checkpoints = tmp_path / "flat" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    # `--ckpt_path best`: the newest run's best checkpoint (Lightning's "best" is only its own fit's, in the
    # same process: "ModelCheckpoint is not configured to save the best model")
    evaluate = ["validate", "--trainer.default_root_dir", str(tmp_path), "--data", "dat_lab.data.SyntheticDataModule",
                "--data.img_size", "32", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu"]
    train([*evaluate, "--name", "flat", "--ckpt_path", "best"])
    config = yaml.safe_load((tmp_path / "flat" / "version_1" / "config.yaml").read_text())
    assert config["ckpt_path"] == str(checkpoints / "best-epoch000.ckpt")
    with pytest.raises(dat_lab.data.DataError, match=re.escape(f"--ckpt_path best: no {tmp_path / 'none'}/version_*/")):
        train([*evaluate, "--name", "none", "--ckpt_path", "best"])


def test_last_ckpt_is_written_at_each_epochs_end_and_where_max_steps_stops(tmp_path):
    """Validated every second epoch, the third epoch's state is still last.ckpt (it was saved at
    validations only); a run stopped by max_steps mid-epoch resumes from there (Throughput had no
    counts without the epoch's start)."""
    quick = ["--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--data.batch_size", "4",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu"]
    _run(tmp_path, *quick, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2", "--name", "sparse")
    last = torch.load(tmp_path / "sparse" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    schedule = lambda ckpt: ckpt["lr_schedulers"][0]["warmup_t"] + ckpt["lr_schedulers"][0]["t_initial"]  # noqa: E731
    assert schedule(last) == 6  # the schedule is as long as the run: max_epochs, or max_steps (README)
    _run(tmp_path, *quick, "--trainer.max_epochs", "-1", "--trainer.max_steps", "3", "--name", "steps")
    path = tmp_path / "steps" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == 3  # one step into the second epoch
    assert schedule(torch.load(path, weights_only=True)) == 3
    _run(tmp_path, *quick, "--trainer.max_epochs", "-1", "--trainer.max_steps", "5", "--name", "steps", "--ckpt_path", "last")
    assert torch.load(path, weights_only=True)["global_step"] == 5


class StopAfterFirstBatch(Callback):
    """Stops training after the first batch, as Lightning's Timer does when max_time is up (its check at
    the fit's start makes max_time 0 stop before any batch)."""

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = True


@pytest.mark.parametrize("accumulate", [pytest.param(1, marks=pytest.mark.slow), 2])  # 2: the same, and more
def test_a_run_stopped_mid_epoch_resumes_the_rest_of_that_epoch(tmp_path, accumulate):
    """Stopped after the first batch (as by max_time), and resumed, the run trains that epoch's other
    batches, and ends with the uninterrupted run's weights (last.ckpt was saved at the epoch's end, and
    Lightning took the epoch as done: 3 steps fewer; then the resumed epoch started its order again).
    Accumulating gradients over 2 batches, the stop comes after the second (after the first, its
    gradients were lost, and the second stepped alone)."""
    quick = ["--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--data.batch_size", "4",
             "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
             "--trainer.max_epochs", "2", "--trainer.accumulate_grad_batches", str(accumulate)]
    _run(tmp_path, *quick, "--name", "stopped", "--trainer.callbacks+=test_training.StopAfterFirstBatch")
    path = tmp_path / "stopped" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == 1
    # written at the epoch's end, the best checkpoint resumes with the next epoch: no place in this one
    best = torch.load(path.parent / "best-epoch000.ckpt", weights_only=True)
    assert "SyntheticDataModule" not in best
    assert torch.load(path, weights_only=True)["SyntheticDataModule"] == {"epoch": 0, "batches": accumulate}
    _run(tmp_path, *quick, "--name", "stopped", "--ckpt_path", "last")
    last = torch.load(path, weights_only=True)
    assert (last["global_step"], last["epoch"]) == (8 // accumulate, 1)
    # the best checkpoint of the stop's validation is known to the resumed run (else it wrote a -v1 beside it)
    assert not [p.name for p in path.parent.iterdir() if "-v" in p.name]
    _run(tmp_path, *quick, "--name", "whole")
    whole = _weights(tmp_path / "whole" / "version_0" / "checkpoints" / "last.ckpt")
    for name, value in _weights(path).items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=0, msg=name)


def test_under_torchrun_a_trainer_of_fewer_devices_than_its_processes_is_refused(tmp_path, monkeypatch):
    """torchrun --nproc_per_node 2 with --trainer.devices 1: each process trained alone, into one run folder."""
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    args = ["fit", "--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)]
    message = ("trainer.devices: torchrun started 2 processes, and the trainer takes 1 (1 device(s) x 1 node(s)); give "
               "--trainer.devices as torchrun's --nproc_per_node and --trainer.num_nodes as its --nnodes")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train(args)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes of one process each
    with pytest.raises(ValueError, match=r"^trainer\.num_nodes: torchrun started 2 processes, and the trainer takes 1 "):
        train(args)
    assert not list(tmp_path.iterdir())


def test_the_offset_record_reads_the_same_images_on_every_device():
    """The sampling figure and mean offset length: of the validation set's first images, whichever share
    of it a device validates (its first batch was each device's own)."""
    data = dat_lab.data.SyntheticDataModule(img_size=8, val_samples=6, batch_size=4)
    data.setup()
    monitor = next(c for c in default_callbacks() if type(c).__name__ == "DeformableMonitor")
    trainer = SimpleNamespace(datamodule=data)
    monitor.on_validation_batch_end(trainer, None, None, (data.val_set[2:6][0], None), 0)
    torch.testing.assert_close(monitor.images, data.val_set[0:4][0], rtol=0, atol=0)


@pytest.mark.parametrize("max_epochs, steps, warmup", [(5, 20, 4), (10, 20, 2), (-1, 10, 4), (-1, 3, 2)])
def test_the_warmup_is_warmup_epochs_of_the_runs_epochs(max_epochs, steps, warmup):
    """warmup_epochs 1, epochs of 4 steps: 4 steps; where max_steps cuts the run short (20 steps of 10
    epochs), a share as large (2); with max_epochs -1 (max_steps alone), an epoch's steps (it was the
    whole run); never the run's last step."""
    module = ImageClassifier(variant="dat_pico", num_classes=10, img_size=32, in_chans=1, warmup_epochs=1.0)
    module._trainer = SimpleNamespace(max_epochs=max_epochs, num_training_batches=8, accumulate_grad_batches=2,
                                      estimated_stepping_batches=steps)  # (Lightning's: the run's steps)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert (scheduler.warmup_t, scheduler.warmup_t + scheduler.t_initial) == (warmup, steps)


def test_the_checkpoint_callbacks_state_keeps_its_name():
    """Lightning keeps a callback's state under a key made of its class name: a run resumes its best
    score and checkpoint only if the key is the one it was saved under."""
    best, last = [c for c in default_callbacks() if isinstance(c, ModelCheckpoint)]  # the best first: Lightning's "best"
    assert best.state_key.startswith("ModelCheckpoint{'monitor': 'val/acc1'")
    assert last.state_key.startswith("LastCheckpoint{'monitor': None")
    assert ModelCheckpoint().state_key not in (best.state_key, last.state_key)  # one a user adds: keys are unique


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path, capsys):
    args = ["--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32", "--model.lr", "1e30",
            "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        train(["fit", *args])
    assert cli.main(["train", *args]) == 2
    assert "dat-lab: error: non-finite training loss" in capsys.readouterr().err


def test_bad_model_config_is_one_line_before_training(tmp_path, capsys):
    assert cli.main(["train", "--config", DIGITS, "--model.overrides", "{offset_rnge: 4}",
                     "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dat-lab: error: unknown config field(s) ['offset_rnge']") and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_refusal_is_all_that_is_printed(tmp_path):
    """Lightning's own lines (its seed's, its Trainer's "GPU available: ...", printed on its loggers, not
    sys.stderr) do not come before it, whether an option or (checked once the Trainer is made) a checkpoint
    is refused."""
    weights = tmp_path / "converted.ckpt"
    dat_lab.save_checkpoint(dat_lab.create_model("dat_pico", num_classes=10, in_chans=1), weights)
    for args, message in ((["--model.lr", "-1"], "--model.lr: -1.0 must be > 0"),
                          (["--ckpt_path", str(weights)], f"--ckpt_path: {weights} holds a model's weights alone")):
        done = run_command([sys.executable, "-m", "cli", "train", "--config", DIGITS, *args,
                            "--trainer.default_root_dir", str(tmp_path)], cwd=ROOT, timeout=600)
        assert (done.returncode, done.stdout) == (2, "") and done.stderr.startswith(f"dat-lab: error: {message}")
        assert done.stderr.count("\n") == 1, done.stderr


def test_resume_last_needs_a_run(tmp_path):
    with pytest.raises(dat_lab.data.DataError, match="nothing to resume"):
        _run(tmp_path, "--config", DIGITS, "--ckpt_path", "last")


def test_bad_options_and_paths_are_one_line(tmp_path, tmp_path_factory, capsys):
    """jsonargparse's nested errors come out as the key and its innermost cause; a checkpoint path
    that is no file is refused before the model is built. A value out of range is named as the option
    given on the command line, or as the config's key."""
    config = tmp_path_factory.mktemp("configs") / "more.yaml"
    config.write_text("trainer: {max_epochs: 0}\ndata: {init_args: {batch_size: 0}}\n")
    for args, message in ((["--data.batch_size", "abc"], "--data.batch_size: Expected a <class 'int'>. Got value: abc"),
                          (["--ckpt_path", str(tmp_path / "nope.ckpt")], f"--ckpt_path: {tmp_path / 'nope.ckpt'} is not a file"),
                          (["--data", "dat_lab.data.ImageFolderDataModule", "--data.root", str(tmp_path / "none")],
                           f"{tmp_path / 'none' / 'train'}: no such folder"),
                          (["--model.lr", "-1"], "--model.lr: -1.0 must be > 0"),  # torch's said "Invalid learning rate"
                          (["--model.ema_decay", "1.5"], "--model.ema_decay: 1.5 must be in (0, 1)"),
                          (["--model.overrides", "{groups: [1, 1, 3, 4]}"],  # raised `from None`: not its cause
                           "stages[2].groups: 3 offset groups do not divide 4 heads"),
                          (["--model.min_lr", "1"], "--model.min_lr: 1.0 must be <= model.lr (0.002)"),
                          # trainer options Lightning takes, then fails on after the run folder is made
                          (["--trainer.check_val_every_n_epoch", "0"], "--trainer.check_val_every_n_epoch: 0 must be >= 1"),
                          (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches: 0 must be >= 1"),
                          (["--trainer.max_time", "00:00:00:abc"], "--trainer.max_time: '00:00:00:abc' must be DD:HH:MM:SS"),
                          (["--trainer.limit_train_batches", "1.5"], "--trainer.limit_train_batches: 1.5 must be a count"),
                          (["--trainer.gradient_clip_val", "-1"], "--trainer.gradient_clip_val: -1 must be >= 0"),
                          (["--trainer.devices", "0"], "--trainer.devices: '0' must be >= 1, -1 for all, device indices"),
                          (["--trainer.devices", "x"], "--trainer.devices: 'x' must be >= 1, -1 for all, device indices"),
                          (["--trainer.devices", "0,1"],  # indices, which the CPU cannot take: Lightning's TypeError
                           "--trainer.devices: `devices` selected with `CPUAccelerator` should be an int > 0."),
                          (["--trainer.accelerator", "mps"], "--trainer.accelerator: `MPSAccelerator` can not run on your system"),
                          (["--trainer.accelerator=gpu"], "--trainer.accelerator: No supported gpu backend found!"),
                          (["--trainer.accelerator", "tpu"], "trainer: Requirement 'torch_xla>=1.13' not met"),  # (or a strategy's)
                          (["--trainer.devices", "-2"], "--trainer.devices: '-2' must be >= 1, -1 for all, device indices"),
                          # a value none of an option's types take: all of them (jsonargparse named the first)
                          (["--seed_everything", "abc"],
                           "--seed_everything: Expected a bool (true or false) or an int. Got value: abc"),
                          (["--trainer.max_epochs", "abc"], "--trainer.max_epochs: Expected an int or null. Got value: abc"),
                          (["--trainer.precision", "12"], "--trainer.precision: Expected one of 64, 32, 16, "
                           "transformer-engine, transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed"),
                          (["--trainer.val_check_interval", "0"], "--trainer.val_check_interval: 0 must be > 0"),
                          (["--trainer.max_epochs", "-1"], "--trainer.max_epochs: -1 (no limit) needs trainer.max_steps"),
                          (["--data.num_workers", "-1"], "--data.num_workers: -1 must be >= 0"),
                          (["--data.init_args.num_workers=-1"], "--data.num_workers: -1 must be >= 0"),
                          (["--data", "dat_lab.data.FooDataModule"], "--data: module 'dat_lab.data' has no attribute "
                           "'FooDataModule' (dat-lab's: SyntheticDataModule, DigitsDataModule, CIFAR10DataModule, "
                           "CIFAR100DataModule, ImageFolderDataModule; or a LightningDataModule's dotted path)"),
                          (["--config", str(config)], "trainer.max_epochs: 0 must be >= 1"),
                          (["--config", str(config), "--trainer.max_epochs", "1"], "data.batch_size: 0 must be >= 1"),
                          (["--trainer.max_epochs", "1", "--config", str(config)], "trainer.max_epochs: 0 must be >= 1"),
                          (["--model.lrr", "0.1"], "unrecognized arguments: --model.lrr 0.1 (did you mean model.lr?)"),
                          # no value: the option as given (argparse named --model.overrides)
                          (["--model.overrides.offset_range", "--trainer.max_epochs", "1"],
                           "--model.overrides.offset_range: expected a value"),
                          (["--model.lr"], "--model.lr: expected a value"),
                          (["--data.batch_sizee", "8"], "--data: Option 'batch_sizee' is not accepted (did you mean batch_size?)"),
                          (["--name", "../escape"], "--name: '../escape' must be a folder name (no / or \\, not . or ..)"),
                          (["--config", str(ROOT / "README.md")], f"--config: {ROOT / 'README.md'} is not valid YAML ("),
                          (["--config", str(tmp_path / "nope.yaml")], f"--config: {tmp_path / 'nope.yaml'} does not exist"),
                          (["--config"], "--config: expected a value")):
        assert cli.main(["train", "--config", DIGITS, "--trainer.default_root_dir", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dat-lab: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # no run folder


def test_trainer_ranges_take_what_lightning_takes():
    from dat_lab.training.cli import check_trainer

    for options in ({"max_epochs": -1, "max_steps": 2, "limit_val_batches": 0, "limit_train_batches": 2.0,
                     "log_every_n_steps": 0, "gradient_clip_val": 0, "check_val_every_n_epoch": None,
                     "max_time": {"hours": 1}}, {"max_time": "00:12:00:00", "limit_test_batches": 0.25}):
        check_trainer(options)
    for devices in ("auto", 1, -1, "2", [0, 1], "0,1", "0, 1,"):  # Lightning's forms
        check_trainer({"devices": devices})
    for devices in ("x", 0, -2, [], [-1], [True], "0;1"):
        with pytest.raises(ValueError, match=r"^trainer.devices: .* must be >= 1, -1 for all, device indices"):
            check_trainer({"devices": devices})
    with pytest.raises(ValueError, match=r"^trainer.max_time: '00:1:00:00' must be DD:HH:MM:SS"):  # Lightning's
        check_trainer({"max_time": "00:1:00:00"})  # Timer reads two digits
    with pytest.raises(ValueError, match=r"^budget.max_epochs: 'abc' is not a number: it must be >= 1"):
        check_trainer({"max_epochs": "abc"}, "budget")


def test_a_wrong_first_word_names_the_subcommands(capsys):
    """predict is not offered (a classifier's predictions are its forward); a config file given as the
    first word is told to be --config; no config at all is told how to give one."""
    for args, message in ((["predict", "--config", DIGITS], "invalid choice: 'predict' (choose from 'fit', 'validate', 'test')"),
                          ([DIGITS], f"{DIGITS}: give a config file as --config {DIGITS}"),
                          (["validate", DIGITS], f"{DIGITS}: give a config file as --config {DIGITS}"),
                          (["validate"], "the following arguments are required: validate.data (give a config, e.g. "
                                         "--config experiments/digits_quick.yaml, or --data CLASS)")):
        assert cli.main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_lightnings_tips_are_not_printed():
    """Lightning logs an advertisement ("💡 Tip: ... try installing litlogger") at every run."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)

    assert not logger.filter(record("💡 Tip: For seamless cloud logging, try installing [litlogger]"))
    assert logger.filter(record("GPU available: False, used: False"))


def test_ddp_on_two_cpu_processes(tmp_path):
    """Lightning's DDP launcher starts the other rank with this process's command line: it must be whole."""
    done = run_command([sys.executable, "-m", "cli", "train", "--config", DIGITS, "--trainer.accelerator", "cpu",
                        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
                        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
                       cwd=ROOT, timeout=600)
    assert done.returncode == 0 and "MEMBER: 2/2" in done.stderr + done.stdout, done.stderr[-2000:]
    assert "Seed set to 0" in done.stderr  # held back while the classes are built, then printed
    assert [p.name for p in (tmp_path / "digits_quick").iterdir()] == ["version_0"]
    assert (tmp_path / "digits_quick" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_evaluating_and_resuming_last_keep_the_run_config(tmp_path, monkeypatch, capsys):
    """`validate --ckpt_path last` evaluates the newest run's last.ckpt and logs to a new version; a
    resumed fit saves its config beside the run's own, which stays as the run was started."""
    short = ["--config", DIGITS, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
    _run(tmp_path, *short, "--trainer.max_epochs", "1")
    run = tmp_path / "digits_quick" / "version_0"
    original = (run / "config.yaml").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(["validate", *short, "--trainer.default_root_dir", str(tmp_path), "--data.batch_size", "100",
               "--ckpt_path", "last"])
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]  # a new version: no best score to keep
    assert "no --ckpt_path" not in capsys.readouterr().err
    train(["validate", *short, "--trainer.default_root_dir", str(tmp_path / "other")])  # untrained weights: said so
    assert "dat-lab train validate: no --ckpt_path: evaluating the model as the config builds it" in capsys.readouterr().err
    assert not [f for f in warnings.filters if f[1] and "dirpath" in f[1].pattern]  # filtered for the evaluation only
    assert (run / "config.yaml").read_text() == original
    assert yaml.safe_load((run.parent / "version_1" / "config.yaml").read_text())["ckpt_path"] == \
        str(run / "checkpoints" / "last.ckpt")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run)) as killed:  # what a run killed in its second epoch had logged after the checkpoint
        for step in (2, 3):
            killed.add_scalar(M.VAL_ACC1, 99.0, step)
    _run(tmp_path, *short, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    logged = [(e.step, e.value) for e in _scalars(run).Scalars(M.VAL_ACC1)]
    assert [step for step, _ in logged] == [1, 3] and 99.0 not in [value for _, value in logged]  # each step once
    assert (run / "config.yaml").read_text() == original
    assert yaml.safe_load((run / "config_resume_1.yaml").read_text())["trainer"]["max_epochs"] == 2
    # the newest run of the name trained another model: refused before the data are touched
    monkeypatch.setattr(dat_lab.data.DigitsDataModule, "prepare_data", lambda self: pytest.fail("data prepared"))
    capsys.readouterr()
    last = run / "checkpoints" / "last.ckpt"
    for command in ("fit", "validate"):  # the newest run's, or named as a file (Lightning would rebuild the
        for ckpt in ("last", str(last)):  # model from the file's hyper-parameters, dropping the options given)
            assert cli.main(["train", command, *short, "--trainer.default_root_dir", str(tmp_path),
                             "--model.overrides", "{groups: [1, 1, 4, 8]}", "--ckpt_path", ckpt]) == 2
            captured = capsys.readouterr()
            assert captured.err.startswith(f"dat-lab: error: --ckpt_path: {last} holds another model (stages[2]."
                                           "groups 2 there, 4 here") and captured.err.count("\n") == 1, captured.err
            assert not captured.out
    # resuming restores the optimizer and its schedule: a new lr would be recorded, not used
    assert cli.main(["train", "fit", *short, "--trainer.default_root_dir", str(tmp_path), "--model.lr", "0.5",
                     "--model.betas", "[0.8, 0.999]", "--trainer.max_epochs", "3", "--ckpt_path", "last"]) == 2
    assert capsys.readouterr().err == (f"dat-lab: error: --ckpt_path: resuming {last} restores its optimizer and "
                                       "learning-rate schedule, so other model options would not take effect (betas "
                                       "[0.9, 0.999] there, [0.8, 0.999] here; lr 0.002 there, 0.5 here); resume with its "
                                       "values, or start a new run from its weights (--model.weights)\n")
    # a checkpoint cut short (killed while saving) or a file that is none: one line, not Lightning's traceback
    (tmp_path / "cut.ckpt").write_bytes(last.read_bytes()[:100_000])
    (tmp_path / "text.ckpt").write_text("hello\n")
    for command in ("fit", "validate"):
        for bad in (tmp_path / "cut.ckpt", tmp_path / "text.ckpt", run / "config.yaml"):
            assert cli.main(["train", command, *short, "--trainer.default_root_dir", str(tmp_path),
                             "--ckpt_path", str(bad)]) == 2
            assert capsys.readouterr().err == (f"dat-lab: error: --ckpt_path: {bad}: not a checkpoint that "
                                               "torch.load(weights_only=True) reads\n")
    # a checkpoint holding other objects than weights: refused unless the user trusts it (--weights_only false)
    import argparse

    trusted = tmp_path / "trusted.ckpt"
    torch.save({**torch.load(last, weights_only=True), "extra": argparse.Namespace(a=1)}, trusted)
    assert cli.main(["train", "validate", *short, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                     str(trusted)]) == 2
    assert capsys.readouterr().err.endswith("not a checkpoint that torch.load(weights_only=True) reads (GLOBAL "
                                            "argparse.Namespace was not an allowed global by default: objects besides weights, if you trust the file: "
                                            "--weights_only false)\n")
    with pytest.raises(pytest.fail.Exception, match="data prepared"):  # past the check, on to the data
        cli.main(["train", "validate", *short, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                  str(trusted), "--weights_only", "false"])
    assert not (run / "config_resume_2.yaml").exists()


def test_only_a_resume_from_last_ckpt_purges_what_was_logged_after_it(tmp_path):
    """From an earlier checkpoint of the run (a best-*.ckpt), the steps the run logged after it stay in
    TensorBoard; from its last.ckpt, what a kill left after it gives way to the resumed run's."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    from dat_lab.training.cli import DatLabCLI

    for name, purged in (("best-epoch002.ckpt", None), ("last.ckpt", 7)):
        logger = TensorBoardLogger(str(tmp_path), name="run", version="version_0")
        resumed = SimpleNamespace(trainer=SimpleNamespace(logger=logger),
                                  checkpoint_file=tmp_path / "run" / "version_0" / "checkpoints" / name)
        DatLabCLI._purge_logged_after(resumed, {"global_step": 7})
        assert logger._kwargs.get("purge_step") == purged, name


def test_a_runs_own_config_with_its_logger_pinned_writes_beside_that_run(tmp_path):
    """A sweep trial's config.yaml names its own folder as the logger's: evaluating or training again
    with it logs to a new version beside the trial, leaving the trial's config and events as they
    were; resuming the trial's checkpoint keeps its folder, its config saved as config_resume_1.yaml."""
    short = ["--config", DIGITS, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path), "name": "study", "version": "trial_0000"}}
    _run(tmp_path, *short, "--trainer.max_epochs", "1", "--trainer.logger", json.dumps(logger))
    trial = tmp_path / "study" / "trial_0000"
    before = {p.name: p.read_bytes() for p in trial.iterdir() if p.is_file()}
    config, last = str(trial / "config.yaml"), str(trial / "checkpoints" / "last.ckpt")
    train(["validate", "--config", config, "--ckpt_path", last])
    _run(tmp_path, "--config", config, "--trainer.max_epochs", "1")
    assert {p.name: p.read_bytes() for p in trial.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["trial_0000", "version_0", "version_1"]
    assert yaml.safe_load((tmp_path / "study" / "version_0" / "config.yaml").read_text())["ckpt_path"] == last
    _run(tmp_path, "--config", config, "--trainer.max_epochs", "2", "--ckpt_path", last)
    assert (trial / "config.yaml").read_bytes() == before["config.yaml"]
    assert yaml.safe_load((trial / "config_resume_1.yaml").read_text())["trainer"]["max_epochs"] == 2
    # `--ckpt_path last` with it: that run's last.ckpt (Lightning would look in a new folder, find none and
    # start afresh), evaluated beside it or resumed in it
    train(["validate", "--config", config, "--ckpt_path", "last"])
    assert yaml.safe_load((tmp_path / "study" / "version_2" / "config.yaml").read_text())["ckpt_path"] == last
    _run(tmp_path, "--config", config, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    state = torch.load(last, weights_only=True)  # the third epoch's (index 2): 3 x 2 steps, none trained twice
    assert (state["epoch"], state["global_step"]) == (2, 6) and (trial / "config_resume_2.yaml").exists()
    # a run of its own (its logger names no version): `last` is the newest run of the logger's folder
    own = tmp_path / "study" / "version_1"
    _run(tmp_path, "--config", str(own / "config.yaml"), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    state = torch.load(own / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 4)  # (0 and 2 before)
    assert (own / "config_resume_1.yaml").exists() and not (tmp_path / "study" / "version_3").exists()


def test_start_from_converted_weights(tmp_path, capsys):
    """`--model.weights` starts from a dat-lab checkpoint (`dat-lab convert` output): every weight of the
    same model; a head of other classes left new, and said so; another model refused in one line, as
    is such a file given as --ckpt_path (which takes a training run's checkpoint)."""
    released = dat_lab.create_model("dat_pico", num_classes=10, img_size=32)
    path = tmp_path / "converted.ckpt"
    dat_lab.save_checkpoint(released, path)
    own = released.state_dict()
    module = ImageClassifier(variant="dat_pico", num_classes=10, img_size=32, weights=str(path))
    assert all(torch.equal(v, own[k]) for k, v in module.model.state_dict().items())
    module = ImageClassifier(variant="dat_pico", num_classes=5, img_size=32, weights=str(path))
    assert all(torch.equal(v, own[k]) for k, v in module.model.state_dict().items() if not k.startswith("cls_head."))
    assert module.model.cls_head.weight.shape == (5, released.num_features)
    assert capsys.readouterr().err == (f"model.weights: {path}: its head (10 classes) is not loaded; this one "
                                       "(5 classes) starts new\n")
    with pytest.raises(ValueError, match=r"^model.weights: .* holds another model \(stages\[0\].offset_range 2.0 "
                                         r"there, 4 here; .*give the variant and overrides it was made with$"):
        ImageClassifier(variant="dat_pico", num_classes=10, img_size=32, overrides={"offset_range": 4}, weights=str(path))
    with pytest.raises(ValueError, match=r"^model.weights: .*nope.ckpt: no such checkpoint$"):
        ImageClassifier(variant="dat_pico", weights=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match=r"holds another model \(img_size 32 there, 64 here\); give --data options "
                                         r"that give the same img_size$"):
        ImageClassifier(variant="dat_pico", num_classes=10, img_size=64, weights=str(path))
    with pytest.raises(ValueError, match=r"holds another model \(img_size 32 there, 64 here; .*\); give --data options "
                                         r"that give the same img_size and the variant and overrides it was made with$"):
        ImageClassifier(variant="dat_pico", num_classes=10, img_size=64, overrides={"offset_range": 4}, weights=str(path))
    synthetic = ["--model.variant", "dat_pico", "--data", "dat_lab.data.SyntheticDataModule", "--data.img_size", "32",
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    assert cli.main(["train", "validate", *synthetic, "--ckpt_path", str(path)]) == 2
    assert capsys.readouterr().err == (f"dat-lab: error: --ckpt_path: {path} holds a model's weights alone (`dat-lab "
                                       f"convert` output): start from them with --model.weights {path}; --ckpt_path "
                                       "takes a training run's checkpoint\n")
    torch.save({"model": own}, tmp_path / "released.pth")  # the released code's format
    assert cli.main(["train", "validate", *synthetic, "--ckpt_path", str(tmp_path / "released.pth")]) == 2
    assert capsys.readouterr().err.startswith(f"dat-lab: error: --ckpt_path: {tmp_path / 'released.pth'} is no training "
                                              "run's checkpoint (released weights?): convert it (`dat-lab convert")


def test_a_checkpoint_of_another_model_is_refused_in_one_line():
    """What `--ckpt_path last` finds when the newest run of a name trained other model options: one
    line naming the fields that differ, before any weight is loaded; the same model loads."""
    trained = ImageClassifier(variant="dat_pico", num_classes=10, img_size=32, overrides={"groups": [1, 1, 4, 8]})
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    ImageClassifier(variant="dat_pico", num_classes=10, img_size=32,
                    overrides={"groups": [1, 1, 4, 8]}).on_load_checkpoint(checkpoint)
    other = ImageClassifier(variant="dat_pico", num_classes=10, img_size=32)
    with pytest.raises(ValueError) as error:
        other.on_load_checkpoint(checkpoint)
    message = str(error.value)
    assert message.startswith("--ckpt_path: the checkpoint holds another model (stages[2].groups 4 there, 2 here; "
                              "stages[3].groups 8 there, 4 here); give the options") and "\n" not in message
    # an option that keeps every weight's shape (the offset range s): evaluating with another would be wrong
    wider = ImageClassifier(variant="dat_pico", num_classes=10, img_size=32, overrides={"groups": [1, 1, 4, 8],
                                                                                        "offset_range": 4.0})
    assert wider.state_dict().keys() == trained.state_dict().keys()
    with pytest.raises(ValueError, match=r"holds another model \(stages\[0\].offset_range 2.0 there, 4.0 here; "):
        wider.on_load_checkpoint(checkpoint)
    saved = torch.load(_save(checkpoint), weights_only=True)  # as read back: tuples where it had lists, or so
    ImageClassifier(variant="dat_pico", num_classes=10, img_size=32,
                    overrides={"groups": [1, 1, 4, 8]}).on_load_checkpoint(saved)


def _save(checkpoint):
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    base = [sys.executable, "-m", "cli", "train", "--config", DIGITS, "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "8", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert run_command(base + ["--name", "whole"], env=env, cwd=ROOT, timeout=600).returncode == 0

    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(base + ["--name", "killed"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let the first checkpoint finish writing, then kill mid-training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert first_epoch < 2, "the run finished before it could be killed"

    resumed = run_command(base + ["--name", "killed", "--ckpt_path", "last"], env=env, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "killed" / "version_1").exists()  # resumed in place
    whole = _weights(tmp_path / "whole" / "version_0" / "checkpoints" / "last.ckpt")
    resumed = _weights(last)
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_parses_and_builds_its_model(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    data_class = {c.__name__: c for c in (ImageFolderDataModule, CIFAR100DataModule, DigitsDataModule)}[
        printed["data"]["class_path"].rsplit(".", 1)[-1]]
    told = data_class.describe(**printed["data"]["init_args"])  # what the data tell the model (linked in `train`)
    expected = {ImageFolderDataModule: (1000, 3, 224), CIFAR100DataModule: (100, 3, 32), DigitsDataModule: (10, 1, 32)}
    assert (told["num_classes"], told["in_chans"], told["img_size"]) == expected[data_class]
    module = ImageClassifier(**{k: v for k, v in printed["model"].items() if v is not None}, **told).eval()
    with torch.no_grad():
        logits = module.model(torch.zeros(1, told["in_chans"], told["img_size"], told["img_size"]))
    assert logits.shape == (1, told["num_classes"])


def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit):
        train(["fit", *args])
    return " ".join(capsys.readouterr().out.split())


def _undocumented(text: str, prefix: str, names) -> list[str]:
    """Options of `--help` text whose entry has no help of its own (only jsonargparse's "(type: ...)")."""
    return [name for name in names
            if re.search(rf"(?<!\[){re.escape(prefix)}\.{name} \S+ \(type:", text)
            or not re.search(rf"(?<!\[){re.escape(prefix)}\.{name} ", text)]


def test_every_model_and_data_option_has_help(capsys):
    text = _help(capsys, "--help")
    linked = {"num_classes", "img_size", "in_chans"}  # set from the data: shown as links, not options
    assert all(f"--> model.{name} [applied on instantiate] set from the data" in text for name in linked)
    assert _undocumented(text, "--model", inspect.signature(ImageClassifier).parameters.keys() - linked) == []
    variant_help = re.search(r"(?<!\[)--model\.variant VARIANT (.*?) --model\.overrides", text).group(1)
    assert [name for name in dat_lab.VARIANTS if name not in re.findall(r"\w+", variant_help)] == []
    for cls in (SyntheticDataModule, DigitsDataModule, CIFAR10DataModule, CIFAR100DataModule, ImageFolderDataModule):
        text = _help(capsys, "--data.help", f"{cls.__module__}.{cls.__name__}")
        assert _undocumented(text, "--data", inspect.signature(cls).parameters) == [], cls.__name__


def test_test_says_it_evaluates_the_validation_split(capsys):
    """(Lightning's description of test is "over the test set": dat-lab's data modules have none; its
    --ckpt_path help speaks of "the previous trainer.fit call", in the same process.)"""
    for command, says in (("test", "A checkpoint file to evaluate; last, best: the newest run of --name"),
                          ("validate", "A checkpoint file to evaluate;"), ("fit", "A checkpoint file to train on from;")):
        with pytest.raises(SystemExit):
            train([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert says in text and "test set" not in text and "previous ``trainer.fit``" not in text, command
        if command == "test":
            assert "Evaluate the model on the data's validation split, as validate does" in text
    with pytest.raises(SystemExit):  # the list of subcommands too, and which one is taken without one
        train(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "test The same as validate (dat-lab's data modules hold no test split of their own)" in text
    assert "fit when none is given fit Train the model" in text and "test set" not in text and "(required)" not in text


def test_one_override_on_the_command_line_keeps_the_files_others(capsys):
    """As the README says: --model.overrides.FIELD changes that field; the dict form replaces them all."""
    config = str(ROOT / "experiments" / "digits_dat_tiny.yaml")
    for args, expected in ((["--model.overrides.offset_range", "4"], {"window": 4, "drop_path_rate": 0.1, "offset_range": 4}),
                           (["--model.overrides", "{offset_range: 4}"], {"offset_range": 4})):
        with pytest.raises(SystemExit):
            train(["fit", "--config", config, *args, "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["model"]["overrides"] == expected
