"""A sweep's trials on devices: DDP inside a trial, GPUs shared among workers, and workers started by a
launcher (torchrun, SLURM's srun)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dat_lab import metrics as M
from dat_lab.sweep import parse_spec, plan
from dat_lab.sweep import runner
from dat_lab.sweep.runner import work
from commands import run_command
from sweep_common import BASE, ROOT, TPE, write_spec


@pytest.mark.parametrize("trainer,strategy", [
    ({"accelerator": "gpu", "devices": 8, "strategy": "ddp"}, "ddp_spawn"),
    ({"devices": 2, "strategy": "ddp_find_unused_parameters_true"}, "ddp_spawn_find_unused_parameters_true"),
    ({"accelerator": "cpu", "devices": 2}, "ddp_spawn"),  # auto on several devices is ddp
    ({"devices": "0,1"}, "ddp_spawn"),
    ({"devices": [0, 1], "strategy": "auto"}, "ddp_spawn"),
    ({"accelerator": "cpu", "devices": 1}, None),  # one device: no strategy set
    ({"devices": 2, "strategy": "ddp_fork"}, "ddp_spawn"),  # forked ranks fail once the worker has used CUDA
    ({"devices": 2, "strategy": "DDP_notebook_find_unused_parameters_true"}, "ddp_spawn_find_unused_parameters_true"),
    ({"accelerator": "tpu", "devices": 8}, None),  # auto is XLA's own there
    ({"accelerator": "tpu", "devices": 8, "strategy": "xla"}, "xla"),
    ({"devices": 1, "strategy": {"class_path": "lightning.pytorch.strategies.SingleDeviceStrategy"}},
     {"class_path": "lightning.pytorch.strategies.SingleDeviceStrategy"}),
    ({"accelerator": "tpu", "devices": 8, "strategy": {"class_path": "lightning.pytorch.strategies.xla.XLAStrategy"}},
     {"class_path": "lightning.pytorch.strategies.xla.XLAStrategy"}),
    ({"devices": 2, "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                 "init_args": {"static_graph": True}}},
     {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"static_graph": True,
                                                                              "start_method": "spawn"}}),
])
def test_ddp_in_a_trial_spawns_its_ranks_instead_of_running_the_command_again(trainer, strategy):
    from dat_lab.sweep.plan import in_worker

    config = {"trainer": trainer, "model": {"lr": 1.0}}
    out = in_worker(config)
    assert out["trainer"].get("strategy") == strategy and out["model"] == {"lr": 1.0}
    assert config["trainer"] == trainer  # not changed in place


def test_the_tracked_values_come_back_from_a_spawned_run_as_callback_metrics():
    from types import SimpleNamespace

    import torch

    from dat_lab.training.callbacks import MetricTracker

    ranks, parent = MetricTracker(metric="train/loss", direction="minimize"), MetricTracker(metric="train/loss", direction="minimize")
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={},
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)))
    for step, value in ((3, 2.0), (5, 1.0), (7, 1.5)):  # validations; then training goes on and logs another train/loss
        trainer.fit_loop.epoch_loop._batches_that_stepped = step
        trainer.callback_metrics["train/loss"] = torch.tensor(value)
        ranks.on_validation_epoch_end(trainer, None)
    trainer.callback_metrics["train/loss"] = torch.tensor(1.7)
    assert ranks.results(trainer) == (1.0, 1.5, 7) == parent.results(trainer)  # the parent read them from the metrics
    assert MetricTracker().results(SimpleNamespace(callback_metrics={})) == (None, None, None)


def test_a_trial_its_ddp_ranks_pruned_ends_pruned_and_a_retry_starts_unpruned(tmp_path, monkeypatch):
    """What Optuna's Lightning callback does on rank 0 of a DDP trial (its system attributes), then
    `check_pruned` in the worker; a retried trial inherits those attributes from the try it retries."""
    from optuna_integration.pytorch_lightning.pytorch_lightning import _EPOCH_KEY, _INTERMEDIATE_VALUE, _PRUNED_KEY

    spec = parse_spec(write_spec(tmp_path, BASE + TPE.replace("n_trials: 2", "n_trials: 1") + "pruner: {name: median}\n"))
    suggest, seen = runner._suggest, []

    def inherited(trial, *args):  # as RetryFailedTrialCallback copies them
        trial.storage.set_trial_system_attr(trial._trial_id, _PRUNED_KEY, True)
        trial.storage.set_trial_system_attr(trial._trial_id, _INTERMEDIATE_VALUE, {0: 0.9})
        return suggest(trial, *args)

    def ranks(args, extra_callbacks):
        [pruning] = [c for c in extra_callbacks if type(c).__name__ == "PyTorchLightningPruningCallback"]
        trial = pruning._trial
        attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
        seen.append((attrs[_PRUNED_KEY], attrs[_INTERMEDIATE_VALUE]))
        for key, value in ((_INTERMEDIATE_VALUE, {0: 0.25}), (_PRUNED_KEY, True), (_EPOCH_KEY, 0)):
            trial.storage.set_trial_system_attr(trial._trial_id, key, value)

    monkeypatch.setattr(runner, "_suggest", inherited)
    monkeypatch.setattr(runner, "train", ranks)
    study = work(spec, storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="t", runs_root=str(tmp_path / "runs"))
    [trial] = study.get_trials()
    assert seen == [(False, None)] and trial.state == TrialState.PRUNED and trial.intermediate_values == {0: 0.25}


def test_a_searched_trial_on_one_device_of_a_base_on_two_trains_in_its_worker(tmp_path, monkeypatch):
    spec = parse_spec(write_spec(tmp_path, BASE + "sampler: tpe\nn_trials: 1\ndelta: {trainer: {devices: 2}}\n"
                             "search_space: {trainer.devices: {type: categorical, choices: [1]}}\n"))
    strategies = []

    def train(args, extra_callbacks):
        strategies.append(args["fit"]["trainer"].get("strategy"))
        raise RuntimeError("stop")

    monkeypatch.setattr(runner, "train", train)
    planned = plan(spec, spec.planned_cells())
    assert planned[0].config["trainer"]["strategy"] == "ddp_spawn"  # the base alone: two devices
    work(spec, storage=f"sqlite:///{tmp_path / 'd.db'}", study_name="t", runs_root=str(tmp_path / "runs"), planned=planned)
    assert strategies == [None]  # not ddp_spawn for one device


def _planned(*trainers):
    from types import SimpleNamespace

    return [SimpleNamespace(config={"trainer": t}) for t in trainers]


@pytest.mark.parametrize("trainers,workers,gpus,shares", [
    ([{"accelerator": "gpu", "devices": 2}], 4, list("01234567"), ["0,1", "2,3", "4,5", "6,7"]),
    ([{"devices": "auto"}], 3, list("01234567"), ["0,1", "2,3", "4,5"]),  # each worker's auto: its share
    ([{"accelerator": "gpu", "devices": 1}], 2, ["3", "5"], ["3", "5"]),  # as CUDA_VISIBLE_DEVICES names them
    ([{"accelerator": "gpu", "devices": 8}], 1, list("01234567"), None),  # one worker: all it sees
    ([{"accelerator": "cpu", "devices": 2}], 4, list("01"), None),  # trials on the CPU
    ([{"devices": "auto"}], 2, [], None),  # auto on a CPU machine
])
def test_workers_on_a_gpu_machine_get_gpus_of_their_own(trainers, workers, gpus, shares):
    assert runner.gpu_shares(_planned(*trainers), workers, gpus) == shares


@pytest.mark.parametrize("trainers,workers,gpus,message", [
    ([{"accelerator": "gpu", "devices": 8}], 4, list("01234567"),
     "trainer.devices: a trial trains on 8 GPUs and each of 4 workers gets 2 of this machine's 8; use "
     "--workers 1, or delta.trainer.devices=2"),
    ([{"accelerator": "gpu", "devices": 8}], 1, list("01"),
     "trainer.devices: a trial trains on 8 GPUs and this machine has 2; use delta.trainer.devices=2"),
    ([{"accelerator": "gpu", "devices": 1}], 3, list("01"), "--workers: 3 workers would share this machine's 2 GPU(s)"),
    ([{"accelerator": "cuda", "devices": 1}], 1, [], "trainer.accelerator: cuda, and this machine has no GPU"),
    ([{"accelerator": "gpu", "devices": [6, 7]}], 4, list("01234567"),
     "trainer.devices: [6, 7] names GPUs by number, and each of 4 workers gets 2 of this machine's 8, numbered "
     "from 0; give a count instead (delta.trainer.devices=2)"),
    ([{"accelerator": "gpu", "devices": "0,2"}], 1, list("01"), "trainer.devices: '0,2' names GPUs by number"),
])
def test_gpus_a_worker_does_not_have_are_refused_before_training(trainers, workers, gpus, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        runner.gpu_shares(_planned(*trainers), workers, gpus)


def test_each_worker_process_sees_its_own_gpus(monkeypatch):
    started = []

    class Proc:
        def __init__(self, argv, env=None, start_new_session=False):
            started.append((argv[-1], (env or {}).get("CUDA_VISIBLE_DEVICES")))

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Proc)
    assert runner.spawn_workers(["spec.yaml"], 2, ["0,1", "2,3"]) == 0
    assert started == [("0", "0,1"), ("1", "2,3")]
    started.clear()
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(Proc, "__init__", lambda self, argv, env=None, start_new_session=False: started.append(env))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runner.spawn_workers(["spec.yaml"], 3) == 0  # on the CPU: each worker its share of the cores
    assert [env["OMP_NUM_THREADS"] for env in started] == ["2"] * 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    started.clear()
    assert runner.spawn_workers(["spec.yaml"], 3) == 0 and started[0]["OMP_NUM_THREADS"] == "5"  # the user's
    for statuses, worst in (([0, 1], 1), ([1, -9], -9), ([-9, 0], -9), ([0, 0], 0)):  # a kill (<0) is the worst
        waits = iter(statuses)
        monkeypatch.setattr(Proc, "wait", lambda self: next(waits))
        assert runner.spawn_workers(["spec.yaml"], 2) == worst
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(runner, "num_cuda_devices", lambda: 2)
    assert runner.visible_gpus() == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner.visible_gpus() == ["0", "1"]


FAKE_WORKER = """
import os, signal, sys, time
path = os.path.join(os.environ["WORKER_LOG"], sys.argv[sys.argv.index("--worker-id") + 1])
got = lambda signum, frame: open(path, "a").write(signal.Signals(signum).name + " ")
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, got)
open(path, "w").close()  # ready
end = time.time() + float(os.environ.get("WORKER_WAIT", 30))  # (30: not reached but by a test's failure)
while not os.path.getsize(path) and time.time() < end:
    time.sleep(0.05)
time.sleep(1)  # a second signal would show
sys.exit(130)
"""


def _signals_as_in_a_terminal(ignore_hangup: bool) -> None:
    """SIGINT as a terminal's command has it (a shell's background job, `make &` say, ignores it, and so would
    Python then), SIGHUP as nohup leaves it or not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if ignore_hangup else signal.SIG_DFL)


@pytest.mark.parametrize("how", ["SIGINT to the process group", "SIGINT", "SIGTERM", "SIGHUP", "SIGHUP ignored"])
def test_a_signal_to_the_sweep_of_several_workers_reaches_each_worker_once(tmp_path, how):
    """A Ctrl-C (SIGINT to the terminal's process group), or a kill of the sweep's process alone: each
    worker gets the signal once (a kill left them training; a Ctrl-C reaches them through the sweep);
    a signal the sweep ignores (under nohup, SIGHUP) reaches none."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    fake.chmod(0o755)
    code = f"import sys; from dat_lab.sweep import runner; sys.executable = {str(fake)!r}; sys.exit(runner.spawn_workers(['s.yaml'], 2))"
    ignored = "ignored" in how
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "WORKER_LOG": str(tmp_path), "WORKER_WAIT": "3" if ignored else "30"},
                              preexec_fn=lambda: _signals_as_in_a_terminal(ignore_hangup=ignored))
    try:
        deadline = time.time() + 60
        while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()) and time.time() < deadline:
            time.sleep(0.1)
        signum = getattr(signal, how.split()[0])
        (os.killpg if "group" in how else os.kill)(parent.pid, signum)
        status = parent.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    if ignored:  # the workers ended of themselves (130), unsignalled
        assert [(tmp_path / i).read_text() for i in "01"] == [""] * 2 and status == 130
        return
    assert [(tmp_path / i).read_text() for i in "01"] == [f"{how.split()[0]} "] * 2
    if signum != signal.SIGINT:
        assert status == 128 + signum
        assert parent.stderr.read().endswith(f"dat-lab: {how}: the workers were stopped; finished cells are stored, "
                                             "and the same command resumes\n")


# what srun gives the one task of a job on one node (the worker)
SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "sweep",
              "SLURM_NODELIST": "localhost"}


# and what torchrun gives a process it starts (with an agent that serves the rendezvous store)
TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
            "ROLE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RUN_ID": "none"}


def test_a_trial_is_rank_0_of_its_own_whatever_launched_the_worker(monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    for name, value in {**SLURM_TASK, **TORCHRUN, "SLURM_PROCID": "3", "NODE_RANK": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_zero_only, "rank", 3)  # as Lightning read SLURM_PROCID or RANK on import
    monkeypatch.setenv("STANDALONE_PORT", "29600")  # a user's choice for Lightning, not a launcher's
    runner.as_own_rank()
    assert rank_zero_only.rank == 0 and not [n for n in TORCHRUN if n in os.environ] and "NODE_RANK" not in os.environ
    assert "SLURM_NTASKS" not in os.environ and os.environ["STANDALONE_PORT"] == "29600"  # no SLURM environment
    assert all(os.environ[n] == v for n, v in SLURM_TASK.items() if n not in ("SLURM_PROCID", "SLURM_NTASKS"))


def test_a_ddp_trial_trains_in_lightnings_own_environment():
    from dat_lab.sweep.plan import LOCAL, in_worker

    out = in_worker({"trainer": {"devices": 2, "strategy": "ddp", "plugins": {"class_path": "x.MyPrecision"}}})
    assert out["trainer"]["plugins"] == [{"class_path": "x.MyPrecision"}, LOCAL]
    assert in_worker({"trainer": {"devices": 2, "strategy": "ddp_spawn"}})["trainer"]["plugins"] == [LOCAL]
    assert "plugins" not in in_worker({"trainer": {"devices": 1}})["trainer"]  # one device: as given
    again = {"trainer": {"devices": 2, "strategy": "ddp", "plugins": [{"class_path": "LightningEnvironment"}]}}
    assert in_worker(again)["trainer"]["plugins"] == again["trainer"]["plugins"]  # a trial's config.yaml as a base
    own = {"class_path": "DDPStrategy", "init_args": {"cluster_environment": LOCAL}}  # Lightning takes one, not two
    assert "plugins" not in in_worker({"trainer": {"devices": 2, "strategy": own}})["trainer"]


def test_a_trial_trains_as_two_ddp_processes_with_pruning_and_its_results_come_back(tmp_path):
    """The base config's `ddp` would start the other rank by running `dat-lab sweep` again (a second
    worker, and the run killed); the trial spawns its ranks, and what rank 0 found reaches the study.
    The worker runs as an srun task: Lightning's SLURM environment made the two ranks two unconnected
    trainings of world size 1 (SLURM_NTASKS) into one run folder; and with torchrun's variables, the ranks
    waited for a rendezvous store that torchrun's agent was to serve, forever."""
    spec = write_spec(tmp_path, BASE + "sampler: {name: tpe, seed: 0}\nn_trials: 1\n"
                  "search_space: {model.lr: {type: float, low: 1.0e-3, high: 3.0e-3}}\n"
                  "pruner: {name: median}\nbudget: {max_epochs: 1, limit_train_batches: 3, limit_val_batches: 2}\n"
                  "delta: {trainer: {accelerator: cpu, devices: 2, strategy: ddp}}\n")
    storage = f"sqlite:///{tmp_path / 'ddp.db'}"
    done = run_command([sys.executable, "-m", "cli", "sweep", str(spec), "--storage", storage,
                        "--runs-root", str(tmp_path / "runs")], cwd=ROOT, timeout=600,
                       env={**os.environ, **SLURM_TASK, **TORCHRUN})
    assert done.returncode == 0 and "MEMBER: 2/2" in done.stdout + done.stderr, done.stderr[-3000:]
    [trial] = optuna.load_study(study_name="t", storage=storage).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == trial.user_attrs["best"] > 0
    assert trial.intermediate_values == {0: trial.value}  # reported by the pruning callback on rank 0
    assert trial.user_attrs["final"] == trial.value and trial.user_attrs["images_per_s"] > 0
    assert trial.user_attrs[M.TRIAL_LAST_STEP] == 2  # 3 batches; Lightning logs the epoch's validation at step 2
    run = Path(trial.user_attrs["run_dir"])
    assert [d.name for d in run.parent.iterdir()] == [run.name]
    assert "strategy: ddp_spawn" in (run / "config.yaml").read_text()


def test_a_sweep_in_a_jobs_second_srun_task_trains_and_logs_its_trials(tmp_path):
    """A worker started as task 1 of `#SBATCH --nodes=2 --ntasks=2`: Lightning's SLURM environment refused
    the job's `--ntasks` (no `--ntasks-per-node`), would resume a trial from a `runs/hpc_ckpt_*.ckpt`
    in the working directory, and made SLURM_PROCID the rank, so that the trial's TensorBoard logger
    (rank-zero-only) wrote nothing. (Lightning reads RANK and LOCAL_RANK first: none here.)"""
    spec = write_spec(tmp_path, BASE + "budget: {max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1}\n")
    slurm = {**SLURM_TASK, "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "1"}
    del slurm["SLURM_NTASKS_PER_NODE"]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "hpc_ckpt_1.ckpt").write_text("another run's")  # what SLURM's auto-requeue leaves
    env = {n: v for n, v in os.environ.items() if not runner.LAUNCHER_VARIABLES.fullmatch(n)}
    done = run_command([sys.executable, "-m", "cli", "sweep", str(spec), "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                        "--runs-root", str(tmp_path / "runs")], cwd=tmp_path, timeout=600,
                       env={**env, **slurm, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "t" / "trial_0000"
    assert list(run.glob("events.out.tfevents.*")) and (run / "hparams.yaml").is_file(), sorted(run.iterdir())
