"""Plain helpers that the training scripts' loops call: the epoch's remaining batches (resume
position, stop requests), evaluation, logging an epoch, saving and restoring checkpoints.

engine.py knows no paradigm: a training step returns a dict of named statistics, and the names
become metrics.csv columns (`train_<name>`), TensorBoard tags and the epoch line.
"""
import atexit
import csv
import datetime
import glob
import json
import math
import os
import random
import signal
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from utils import (RunComplete, RunFailure, UsageError, all_reduce_sum, evaluate, init_files, net_labels, sync_replicas,
                   unwrap)

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# The run: its directory, what it resumed from, the best epoch so far
# ----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What one invocation of a training script carries from epoch to epoch (plain data).

    `resumable` maps names to the script's objects with state_dict()/load_state_dict() (the
    gradient scaler, the perturbation's generators, ...): they go into every checkpoint.
    """
    args: object
    rt: object
    names: list
    info: object
    nets: list
    optimizers: list
    resumable: dict
    steps_per_epoch: int
    run_dir: str
    script: str = ""
    labels: list = field(default_factory=list)
    start_epoch: int = 0        # epochs completed before this invocation
    start_step: int = 0         # steps of epoch `start_epoch` completed before it (mid-epoch resume)
    resumed: dict = field(default_factory=dict)    # the checkpoint's "extra" entry (fresh run: empty)
    best: dict = field(default_factory=dict)
    best_states: list = field(default_factory=list)
    metrics: object = None
    last_rows: list = field(default_factory=list)
    lock: tuple = None          # (path, content) of the run directory's lock, held by the main process


def start_run(args, script, names, rt, info, nets, optimizers, *, steps_per_epoch, resumable):
    """Open the run directory and, with --resume, restore the group, its optimizers and `resumable`
    from the checkpoint; returns the RunState the loop's helpers take."""
    args.world_size = rt.world_size
    resume = resolve_resume(args)
    run_dir = args.out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else
                               os.path.join("runs", f"{script}-{args.dataset}-{'-'.join(names).replace(':', '_')}-"
                                                    f"{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    n = len(nets)
    run = RunState(args, rt, list(names), info, nets, optimizers, resumable, steps_per_epoch, run_dir, script,
                   labels=net_labels(names), best={"val_acc": [-1.0] * n, "epoch": [0] * n, "test_acc": [None] * n},
                   best_states=[None] * n)
    best_ckpt = restore_run(run, resume) if resume else None
    if rt.distributed:
        check_same_resume_point(run)
    if rt.is_main:
        run.lock = prepare_run_dir(run_dir, fresh=resume is None, args=args)
    run.metrics = MetricsLog(run_dir, rt, run.start_epoch, resumed=resume is not None)
    if best_ckpt is not None and rt.is_main and not os.path.exists(os.path.join(run_dir, "best.pt")):
        atomic_save(best_ckpt, os.path.join(run_dir, "best.pt"))  # the new run directory is complete
    if rt.is_main:
        save_json(vars(args), os.path.join(run_dir, "args.json"))
    print_main(rt, describe_run(run, resume), *describe_nets(run, resume))
    return run


# What a run writes into its directory (--overwrite deletes these, and nothing else).
RUN_FILES = ("args.json", "metrics.csv", "last.pt", "best.pt", "results.json", "events.out.tfevents.*",
             "predictions.png", "curves.png")
LOCK_FILE = ".lock"


def prepare_run_dir(run_dir, *, fresh, args):
    """Create the run directory and lock it for this process; a fresh run refuses a directory that
    holds an earlier run unless --overwrite (which deletes that run's files). Temporary files left by
    killed processes are removed. Returns the lock (see lock_run_dir)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = lock_run_dir(run_dir)
        for tmp in glob.glob(os.path.join(glob.escape(run_dir), "*.tmp*")):
            pid = tmp.rsplit(".tmp", 1)[1]
            if pid.isdigit() and not process_alive(int(pid)):
                os.remove(tmp)
        earlier = [p for pattern in RUN_FILES for p in glob.glob(os.path.join(glob.escape(run_dir), pattern))]
        # --resume auto without a last.pt: the earlier run ended before its first epoch, nothing to keep
        if fresh and earlier and (getattr(args, "overwrite", False) or args.resume == "auto"):
            for path in earlier:
                os.remove(path)
        elif fresh and earlier:
            raise UsageError(f"--out-dir '{run_dir}' holds an earlier run ({', '.join(sorted(map(os.path.basename, earlier))[:4])}); "
                             f"continue it with --resume auto, start afresh there with --overwrite, or choose another --out-dir")
        return lock
    except OSError as error:
        raise RunFailure(f"cannot write to run directory '{run_dir}': {error.strerror or error}") from None


def process_alive(pid):
    """True when a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_run_dir(run_dir):
    """Take <run_dir>/.lock for this process (released by finish(), or at exit): two runs never
    write one directory. A lock left by a process that no longer runs on this host is taken over.
    Returns (path, content) for unlock_run_dir."""
    path, host = os.path.join(run_dir, LOCK_FILE), os.uname().nodename
    mine = f"{os.getpid()} {host}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, _, owner = open(path).read().strip().partition(" ")
            except FileNotFoundError:
                continue  # released meanwhile
            same_host = owner == host
            if same_host and pid.isdigit() and (int(pid) == os.getpid() or not process_alive(int(pid))):
                os.remove(path)  # stale (a killed run), or an earlier main() of this very process
                continue
            where = "on this machine" if same_host else f"on host {owner} (if no run goes on there, delete {path})"
            raise UsageError(f"run directory '{run_dir}' is in use by process {pid} {where}; wait for it to end or choose another --out-dir")
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        atexit.register(unlock_run_dir, path, mine)
        return path, mine
    raise UsageError(f"could not lock run directory '{run_dir}' ({path} keeps changing)")


def unlock_run_dir(path, mine):
    """Remove the lock if it is still this process's."""
    try:
        if open(path).read() == mine:
            os.remove(path)
    except OSError:
        pass


def restore_run(run, path):
    """Load checkpoint `path` into the run; returns the best.pt beside it (or None)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("script", run.script) != run.script:
        raise UsageError(f"--resume '{path}' was written by the {ckpt['script']} script; this is the {run.script} script")
    if ckpt["epoch"] >= run.args.epochs and run.args.resume == "auto":
        raise RunComplete(f"the run in '{os.path.dirname(path)}' is complete ({ckpt['epoch']} of {run.args.epochs} epochs): "
                          f"nothing to do (raise --epochs to train on)")
    restore_checkpoint(ckpt, path, run.args, run.info, run.names, run.nets, run.optimizers, run.rt)
    run.start_epoch, run.start_step, run.resumed = ckpt["epoch"], ckpt["step"], ckpt["extra"]
    if run.start_epoch >= run.args.epochs:
        raise UsageError(f"--resume '{path}' has already trained {run.start_epoch} of {run.args.epochs} epochs; "
                         f"to train on, raise --epochs (the learning-rate schedule then spans the new total)")
    for key, obj in run.resumable.items():
        if run.resumed.get(key):  # a disabled GradScaler saves {}: nothing to restore
            obj.load_state_dict(run.resumed[key])
    # The best weights so far sit next to the checkpoint (--out-dir may name a new directory).
    best_path = os.path.join(os.path.dirname(os.path.abspath(path)), "best.pt")
    if os.path.exists(best_path):
        try:
            best_ckpt = load_checkpoint(best_path)
        except UsageError as error:
            raise UsageError(f"{error}; it holds the best weights so far: remove or rename it to resume "
                             f"(best-checkpoint selection then restarts from this run)") from None
        run.best, run.best_states = run.resumed.get("best", run.best), best_ckpt["nets"]
        return best_ckpt
    if max(run.resumed.get("best", run.best)["val_acc"]) >= 0:
        print(f"note: no best.pt next to '{path}': best-checkpoint selection restarts from this run", flush=True)
    return None


def check_same_resume_point(run):
    """Under torchrun every rank reads the checkpoint itself: one that finds none, or another one,
    would train a different model in lockstep with the others."""
    where = torch.tensor([run.start_epoch, run.start_step], device=run.rt.device)
    lowest, highest = where.clone(), where.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if not torch.equal(lowest, highest):
        raise UsageError(f"the processes found different checkpoints to resume from (epoch {run.start_epoch} "
                         f"step {run.start_step} on rank {run.rt.rank}); the run directory must be on storage that every node reads")


def describe_run(run, resume):
    """The one startup line: what trains on what, where, how, and the run directory."""
    args, rt, info = run.args, run.rt, run.info
    where = (f" from epoch {run.start_epoch + 1}" + (f" step {run.start_step}" if run.start_step else "")) if resume else ""
    synthetic = " (SYNTHETIC data: numbers mean nothing)" if info.synthetic else ""
    scaling = ", lr x{} (--lr-scaling linear)".format(rt.world_size) if rt.distributed and args.lr_scaling == "linear" else ""
    return (f"{'resuming' if resume else 'training'} {', '.join(run.labels)} on {info.name}{synthetic}{where}: "
            f"{info.train_size} train / {info.val_size} val / {info.test_size} test images{f' from {info.source}' if info.source else ''}, "
            f"{info.in_chans}x{info.img_size}px, {info.num_classes} classes, device {rt.device}, amp {rt.amp_dtype}, "
            f"{rt.world_size} process(es) x batch {args.batch_size} (global {args.batch_size * rt.world_size})"
            f"{scaling}{', SyncBatchNorm' if rt.sync_bn else ''}, compile {'on' if rt.compile else 'off'}, "
            f"CUDA graphs {'on' if rt.cuda_graphs else 'off'}; run dir {run.run_dir}")


def describe_nets(run, resume):
    """One startup line per network: parameters, where its weights come from, its optimizer and peak rate."""
    init = init_files(run.args, len(run.nets)) if hasattr(run.args, "init") else {}
    lines = []
    for i, (label, net, optimizer) in enumerate(zip(run.labels, run.nets, run.optimizers)):
        params = sum(p.numel() for p in unwrap(net).parameters())
        start = ("weights of the checkpoint" if resume else
                 f"initialised from {init[i][0]}{'@' + init[i][1] if init[i][1] else ''}" if i in init else "random initial weights")
        if optimizer is None:
            training = "frozen (--freeze: no optimizer, eval mode)"
        else:
            group = optimizer.param_groups[0]
            training = f"{type(optimizer).__name__} peak lr {float(group['lr']):.4g}, weight decay {group['weight_decay']:g}"
        lines.append(f"  {label}: {params / 1e6:.2f}M parameters, {start}, {training}")
    return lines


def print_main(rt, *lines):
    """Print on the main process only."""
    if rt.is_main:
        for line in lines:
            print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# One epoch: its batches, its statistics, evaluation, logging, checkpoints
# ----------------------------------------------------------------------------------------------
class EpochStats:
    """Sums of each named per-network statistic over an epoch's steps, kept on the device (read
    once per epoch: no host synchronisation per step). A step returns {name: tensor of shape (n,)}
    (or a scalar for one network); the epoch's value of a statistic is its mean over steps."""

    def __init__(self, rt):
        self.rt, self.sums, self.steps, self.seconds = rt, {}, 0, None
        self.first_step = 0          # the epoch's first step trained here (> 0 on a mid-epoch resume)
        self.first_nonfinite = None  # per network: the first step with a NaN/inf statistic, -1 if none

    def add(self, stats):
        """Add one step's statistics (a dict of device tensors)."""
        values = [value.detach().to(torch.float64).reshape(-1) for value in stats.values()]
        for name, value in zip(stats, values):
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        # Divergence is noted on the device (no host read per step) and read at the epoch's end.
        bad = ~torch.isfinite(torch.stack(values)).all(0)
        if self.first_nonfinite is None:
            self.first_nonfinite = torch.full_like(bad, -1, dtype=torch.int64)
        self.first_nonfinite = torch.where(bad & (self.first_nonfinite < 0), self.first_step + self.steps, self.first_nonfinite)
        self.steps += 1

    def _reduced(self):
        """{name: per-network sums over every process} on the host (a collective under torchrun)."""
        if not self.sums:
            return {}
        stacked = all_reduce_sum(torch.stack(list(self.sums.values())), self.rt).cpu()
        return dict(zip(self.sums, stacked))

    def means(self):
        """Per-network dicts {name: mean over every process's steps}."""
        steps = max(self.steps * self.rt.world_size, 1)
        columns = {name: (sums / steps).tolist() for name, sums in self._reduced().items()}
        n = len(next(iter(columns.values()))) if columns else 0
        return [{name: values[i] for name, values in columns.items()} for i in range(n)]

    def state_dict(self):
        """Sums over all processes and the step count, for a mid-epoch checkpoint (a collective)."""
        return {"sums": self._reduced(), "steps": self.steps}

    def load_state_dict(self, state):
        """Restore the step count, and the sums on rank 0 only: they already cover every process."""
        keep = 1.0 if self.rt.is_main else 0.0
        self.sums = {name: (sums * keep).to(self.rt.device) for name, sums in state["sums"].items()}
        self.steps = int(state["steps"])


def remaining_batches(run, loader, epoch, stop, stats):
    """Yield (step, batch) for the steps of `epoch` this invocation still has to train.

    On a mid-epoch resume the already-trained steps are drawn from the loader and dropped (so its
    random stream stays exact) and `stats` gets their sums back. After each step a SIGINT/SIGTERM
    is honoured: the state is saved as last.pt and the process exits. `stats.seconds` ends up as
    the wall time of the steps trained here.
    """
    loader.set_epoch(epoch)
    skip = run.start_step if epoch == run.start_epoch else 0
    if skip:
        stats.load_state_dict(run.resumed["stats"])
    stats.first_step = skip
    start = now()
    interval = log_interval(run.args) if run.rt.is_main else 0
    lines = IntervalLog(run, epoch, skip, stats)
    images = run.args.batch_size * run.rt.world_size  # the bar counts images, so its rate is images/s
    for step, batch in enumerate(progress(loader, progress_enabled(run.args, run.rt), desc=f"epoch {epoch + 1}",
                                          unit="img", unit_scale=images)):
        if step < skip:
            continue
        yield step, batch
        if interval and (step + 1) % interval == 0:
            lines.write(step + 1)
        if stop.requested(step):
            interrupt(run, stop, epoch, step + 1, stats)
    stats.seconds = now() - start


# Steps between two --log-interval lines when stdout is not a terminal (a batch job's log file).
LOG_INTERVAL = 50


def log_interval(args):
    """--log-interval, or its default: LOG_INTERVAL steps when stdout is not a terminal, 0 (off) on one."""
    if getattr(args, "log_interval", None) is not None:
        return args.log_interval
    return 0 if sys.stdout.isatty() else LOG_INTERVAL


class IntervalLog:
    """The --log-interval lines of one epoch: the epoch's mean loss so far per network, the learning
    rate, images/s since the last line, and the time left in the epoch and the run (training steps
    only). Each line reads the device once (the loss sums, which waits for the queued steps);
    between lines nothing is read."""

    def __init__(self, run, epoch, first_step, stats):
        self.run, self.epoch, self.stats = run, epoch, stats
        self.step, self.time = first_step, time.perf_counter()

    def write(self, step):
        """Print the line after `step` steps of the epoch."""
        run, stats = self.run, self.stats
        loss = (stats.sums["loss"] / max(stats.steps, 1)).tolist() if "loss" in stats.sums else []  # the one read
        seconds = time.perf_counter() - self.time
        per_step = seconds / max(step - self.step, 1)
        images = (step - self.step) * run.args.batch_size * run.rt.world_size / max(seconds, 1e-9)
        # with --cuda-graphs a rate is a device tensor: its value was written by the host this step
        lrs = [float(opt.param_groups[0]["lr"]) if opt is not None else 0.0 for opt in run.optimizers]
        epoch_left = (run.steps_per_epoch - step) * per_step
        run_left = epoch_left + (run.args.epochs - self.epoch - 1) * run.steps_per_epoch * per_step
        print(f"epoch {self.epoch + 1}/{run.args.epochs} step {step}/{run.steps_per_epoch} | "
              f"loss {' '.join(f'{v:.4f}' for v in loss)} | lr {' '.join(dict.fromkeys(f'{lr:.4g}' for lr in lrs))} | "
              f"{images:.0f} img/s | ETA epoch {clock(epoch_left)}, run {clock(run_left)}", flush=True)
        self.step, self.time = step, time.perf_counter()


def clock(seconds):
    """Seconds as H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


def evaluate_epoch(run, val_loader, test_loader, epoch):
    """{"val": ..., "test": ...}: per-network (and ensemble) loss/acc/top5 after `epoch`; both None
    on an epoch that --eval-every skips (the last epoch, and the last of this invocation, never are)."""
    sync_replicas(run.nets, run.rt, epoch)
    last = epoch + 1 == run.args.epochs or (
        run.args.stop_after is not None and epoch + 1 - run.start_epoch >= run.args.stop_after)
    if (epoch + 1) % getattr(run.args, "eval_every", 1) and not last:
        return {"val": None, "test": None}
    shown = progress_enabled(run.args, run.rt)
    val = evaluate(run.nets, progress(val_loader, shown, desc="validation"), run.rt) if val_loader is not None else None
    return {"val": val, "test": evaluate(run.nets, progress(test_loader, shown, desc="test"), run.rt)}


def log_epoch(run, epoch, stats, evals, schedule):
    """Write epoch `epoch`'s rows (one per network, plus the ensemble) to metrics.csv, TensorBoard
    and the console; returns them."""
    # Only the steps this invocation ran (a resumed epoch replays the others without training).
    steps = run.steps_per_epoch - (run.start_step if epoch == run.start_epoch else 0)
    seconds = stats.seconds or float("nan")
    lrs = schedule.rates((epoch + 1) * run.steps_per_epoch - 1)   # the rate of the epoch's last step
    train = stats.means()
    rows = []
    for i, label in enumerate(run.labels + (["ensemble"] if len(run.nets) > 1 else [])):
        row = {"epoch": epoch + 1, "net": label, "model": run.names[i] if i < len(run.names) else "+".join(run.names)}
        if i < len(run.nets):
            row["lr"] = lrs[i]
            row.update({f"train_{name}": value for name, value in train[i].items()})
        for split, result in evals.items():
            if result is not None:
                row.update({f"{split}_{name}": value for name, value in result[i].items()})
        if i < len(run.nets):
            row["epoch_time_s"] = seconds
            row["images_per_s"] = steps * run.args.batch_size * run.rt.world_size / seconds
        rows.append(row)
    run.metrics.write(epoch + 1, rows)
    print_main(run.rt, *(epoch_line(epoch + 1, run.args.epochs, row) for row in rows))
    run.last_rows = rows
    check_finite(run, epoch, stats, train)
    return rows


def check_finite(run, epoch, stats, train):
    """Stop a run whose training statistics became NaN or infinite, before its weights are saved."""
    bad = [i for i, row in enumerate(train) if not all(math.isfinite(v) for v in row.values())]
    if not bad:
        return
    i = bad[0]
    first = int(stats.first_nonfinite[i]) if stats.first_nonfinite is not None else -1
    last = os.path.join(run.run_dir, "last.pt")
    kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
    run.metrics.close()
    raise RunFailure(f"training diverged: {run.labels[i]}'s statistics became non-finite in epoch {epoch + 1}"
                     + (f" (first at step {first})" if first >= 0 else "") + f"; nothing of this epoch was saved, "
                     f"{kept}; lower --lr or check the flags", exit_code=3)


def epoch_line(epoch, epochs, row):
    """One console summary line for one network (or the ensemble) after an epoch."""
    parts = [f"epoch {epoch:>3}/{epochs}", f"{row['net']:<18}"]
    if "lr" in row:
        parts.append(f"lr {row['lr']:.4g}")
    train = [f"{key[6:]} {value:.2f}%" if key.endswith("acc") else f"{key[6:]} {value:.4f}"
             for key, value in row.items() if key.startswith("train_")]
    if train:
        parts.append("train " + " ".join(train))
    parts += [f"{split} {row[f'{split}_acc']:.2f}%" for split in ("val", "test") if f"{split}_acc" in row]
    if "epoch_time_s" in row:
        parts.append(f"{row['epoch_time_s']:.1f}s {row['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def save_checkpoints(run, epoch, evals):
    """After epoch `epoch`: last.pt always; best.pt when a network's validation accuracy improved
    (each network's weights of its best epoch; the test set never selects)."""
    val, test = evals["val"], evals["test"]
    improved = False
    for i in range(len(run.nets) if val is not None else 0):
        if val[i]["acc"] > run.best["val_acc"][i]:
            run.best["val_acc"][i], run.best["epoch"][i], run.best["test_acc"][i] = val[i]["acc"], epoch + 1, test[i]["acc"]
            run.best_states[i] = {k: v.detach().cpu().clone() for k, v in unwrap(run.nets[i]).state_dict().items()}
            improved = True
    if not run.rt.is_main:
        return
    if improved:
        best = make_run_checkpoint(run, epoch + 1, 0)
        best["nets"], best["optimizers"] = run.best_states, []
        atomic_save(best, os.path.join(run.run_dir, "best.pt"))
    atomic_save(make_run_checkpoint(run, epoch + 1, 0), os.path.join(run.run_dir, "last.pt"))


def stop_after_epoch(run, epoch, stop):
    """True when this invocation ends after `epoch` (--stop-after); a SIGINT/SIGTERM received during
    the epoch saves the state and exits here (after the last epoch, finishing is quicker)."""
    if epoch + 1 < run.args.epochs and stop.requested():
        interrupt(run, stop, epoch + 1, 0)
    return run.args.stop_after is not None and epoch + 1 - run.start_epoch >= run.args.stop_after


def finish(run):
    """Print and save (results.json) the last epoch's and the best-validation numbers; unlock the run directory."""
    run.metrics.close()
    if run.lock:
        unlock_run_dir(*run.lock)
    if not run.last_rows:
        return None
    results = {"run_dir": run.run_dir, "script": run.script, "dataset": run.info.name, "synthetic": run.info.synthetic,
               "epochs": run.last_rows[0]["epoch"], "networks": []}
    for i, row in enumerate(run.last_rows):
        entry = {"net": row["net"], "model": row["model"], "final_test_acc": row["test_acc"],
                 "final_val_acc": row.get("val_acc")}
        if i < len(run.nets) and row.get("val_acc") is not None:
            entry.update(best_val_acc=run.best["val_acc"][i], best_epoch=run.best["epoch"][i],
                         test_acc_at_best_val=run.best["test_acc"][i])
        results["networks"].append(entry)
    if run.rt.is_main:
        save_json(results, os.path.join(run.run_dir, "results.json"))
        print_main(run.rt, "final test accuracy (last epoch): " + ", ".join(
            f"{e['net']} {e['final_test_acc']:.2f}%" for e in results["networks"]))
    return results


# ----------------------------------------------------------------------------------------------
# metrics.csv and TensorBoard
# ----------------------------------------------------------------------------------------------
def read_metrics(run_dir):
    """{network label: {column: [(epoch, value), ...]}} from a run's metrics.csv: every numeric column
    a network's rows have values in, by epoch; None without the file."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return None
    series = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            columns = series.setdefault(row["net"], {})
            for key, value in row.items():
                if key not in (None, "epoch", "net", "model") and value:
                    columns.setdefault(key, []).append((int(row["epoch"]), float(value)))
    return {net: {key: sorted(values) for key, values in columns.items()} for net, columns in series.items()}


class MetricsLog:
    """metrics.csv (one row per epoch per network, plus the ensemble; its columns are the names the
    rows carry) and TensorBoard scalars, written by the main process."""

    def __init__(self, run_dir, rt, start_epoch, *, resumed):
        self.enabled, self.writer = rt.is_main, None
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._rewrite(keep_through=start_epoch)  # a resumed run trains the later epochs again
        try:
            from torch.utils.tensorboard import SummaryWriter  # slow to import, and only rank 0 needs it
        except ImportError as error:
            print(f"warning: TensorBoard unavailable ({error}); metrics.csv is still written", flush=True)
            return
        # A restarted run would otherwise leave a second event file repeating the redone steps.
        self.writer = SummaryWriter(run_dir, purge_step=start_epoch + 1 if resumed else None)

    def _rewrite(self, keep_through, new_rows=()):
        """Rewrite the CSV atomically with its rows of epochs <= keep_through, then `new_rows`."""
        rows, columns = [], []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = [r for r in reader if int(r["epoch"]) <= keep_through]
        if not (rows or new_rows) and not os.path.exists(self.csv_path):
            return
        for row in new_rows:
            columns += [key for key in row if key not in columns]

        def write(f):
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
            writer.writerows({k: _fmt(v) for k, v in row.items()} for row in new_rows)

        atomic_write(self.csv_path, write, mode="w")

    def write(self, epoch, rows):
        """Record epoch `epoch`'s rows (dicts of column name -> value)."""
        if not self.enabled:
            return
        self._rewrite(keep_through=epoch - 1, new_rows=rows)
        if self.writer is None:
            return
        for row in rows:
            for key, value in row.items():
                if key not in ("epoch", "net", "model") and isinstance(value, (int, float)):
                    split, _, metric = key.partition("_")
                    self.writer.add_scalar(f"{split}/{metric}/{row['net']}" if metric else f"{key}/{row['net']}", value, epoch)
        self.writer.flush()

    def close(self):
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()


def _fmt(value):
    """CSV cell: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def progress(iterable, enabled, **kwargs):
    """tqdm progress bar, or the bare iterable when disabled."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def progress_enabled(args, rt):
    """--progress if given, else only when stdout is a terminal (and on the main process)."""
    wanted = sys.stdout.isatty() if args.progress is None else args.progress
    return wanted and rt.is_main


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file, flush it to disk, then rename it over `path`: a crash (or a
    node that dies, on shared storage) leaves the old file or the new one, never a truncated one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # a full or read-only disk: the previous file, if any, is untouched
        raise RunFailure(f"could not write '{path}': {error.strerror or error}"
                         + (f"; {os.path.basename(path)} keeps its previous version" if os.path.exists(path) else "")) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    """Write JSON atomically (see atomic_write)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def load_checkpoint(path):
    """Load one of our checkpoints (weights only); UsageError when missing, corrupt or foreign."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' " + ("is a directory, not a checkpoint file" if os.path.isdir(path) else "does not exist"))
    if not zipfile.is_zipfile(path):
        raise UsageError(f"'{path}' is not a PyTorch checkpoint file (expected a .pt written by this repository's scripts)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UsageError(f"'{path}' is not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "nets" not in ckpt:
        raise UsageError(f"'{path}' is not a checkpoint written by this repository's scripts")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise UsageError(f"'{path}' is an incomplete checkpoint (no {', '.join(missing)}): rewrite it with this repository's scripts")
    return ckpt


# What every checkpoint holds (demo.py rebuilds the group from it; --resume continues it).
CHECKPOINT_KEYS = ("models", "num_classes", "img_size", "in_chans", "dataset", "classes", "mean", "std", "args",
                   "epoch", "step", "nets", "optimizers", "rng", "extra")


def rng_state(rt):
    """All random generator states, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2] if len(random.getstate()) > 2 else None,
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None}


def set_rng_state(state, rt):
    """Restore what rng_state() saved."""
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)


def make_checkpoint(args, info, names, nets, optimizers, rt, *, epoch, step, extra=None):
    """Everything needed to rebuild the group (demo.py) and to continue training exactly.

    `epoch` is the number of completed epochs and `step` the iterations already done in the next
    one (0 at an epoch boundary; > 0 only when training was interrupted mid-epoch).
    """
    return {"format": CHECKPOINT_FORMAT, "models": list(names), "num_classes": info.num_classes,
            "img_size": info.img_size, "in_chans": info.in_chans, "dataset": info.name,
            "classes": list(info.classes), "mean": list(info.mean), "std": list(info.std),
            "args": {k: v for k, v in vars(args).items()}, "epoch": epoch, "step": step,
            "nets": [{k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()} for net in nets],
            "optimizers": [opt.state_dict() if opt is not None else {} for opt in optimizers],  # {}: a --freeze network
            "rng": rng_state(rt), "extra": extra or {}}


def make_run_checkpoint(run, epoch, step, stats=None):
    """make_checkpoint for the run, with the script's resumable state, the best-so-far record and,
    mid-epoch, the epoch's statistics so far."""
    extra = {key: obj.state_dict() for key, obj in run.resumable.items()}
    extra["best"] = run.best
    if stats is not None:
        extra["stats"] = stats.state_dict()
    return {**make_checkpoint(run.args, run.info, run.names, run.nets, run.optimizers, run.rt,
                              epoch=epoch, step=step, extra=extra), "script": run.script}


# Flags that fix which images each step sees, and how they are augmented: a resumed run (mid-epoch
# ones above all) needs them unchanged; and --freeze, which decides which networks have optimizer
# state in the checkpoint.
RESUME_MUST_MATCH = ("dataset", "batch_size", "train_subset", "split_seed", "val_size", "seed", "crop", "rotate",
                     "freeze")


def restore_checkpoint(ckpt, path, args, info, names, nets, optimizers, rt):
    """Load a training checkpoint into the group after checking it is the same group and task."""
    if list(ckpt["models"]) != list(names):
        raise UsageError(f"--resume '{path}' holds models {ckpt['models']}, this run builds {list(names)}")
    if ckpt["num_classes"] != info.num_classes or ckpt["img_size"] != info.img_size or ckpt["in_chans"] != info.in_chans:
        raise UsageError(f"--resume '{path}' was trained for {ckpt['num_classes']} classes at "
                         f"{ckpt['in_chans']}x{ckpt['img_size']}px; this run has {info.num_classes} classes at "
                         f"{info.in_chans}x{info.img_size}px")
    for flag in RESUME_MUST_MATCH:
        if flag in ckpt["args"] and ckpt["args"][flag] != getattr(args, flag, None):
            raise UsageError(f"--resume '{path}' was written with --{flag.replace('_', '-')} {ckpt['args'][flag]}; "
                             f"this run has {getattr(args, flag, None)} (a resumed run must keep it: " +
                             ("the same networks train" if flag == "freeze" else "the same data in the same batches") + ")")
    if ckpt["args"].get("world_size", 1) != rt.world_size:
        raise UsageError(f"--resume '{path}' was written by {ckpt['args'].get('world_size', 1)} processes; "
                         f"resume it with the same number (this run has {rt.world_size})")
    for net, state in zip(nets, ckpt["nets"]):
        unwrap(net).load_state_dict(state)
    for optimizer, state in zip(optimizers, ckpt["optimizers"]):
        if optimizer is not None:
            load_optimizer_state(optimizer, state)
    set_rng_state(ckpt["rng"], rt)


# The group settings that belong to this run, not to the run that wrote the checkpoint: the kernels
# (foreach on the CPU, fused on CUDA, capturable with --cuda-graphs) and the rate holder (a device tensor that a
# captured step reads must stay the same tensor; the schedule rewrites its value every step).
RUN_OWNED_GROUP_KEYS = ("lr", "fused", "capturable", "foreach")


def load_optimizer_state(optimizer, state):
    """Load a checkpoint's optimizer state (moments, step counts, hyper-parameters) while keeping
    this run's kernels and learning-rate tensors, so a run resumes with or without --cuda-graphs
    whatever wrote the file."""
    owned = [{k: group[k] for k in RUN_OWNED_GROUP_KEYS if k in group} for group in optimizer.param_groups]
    # torch casts saved Adam step counts by the *loaded* groups' fused/capturable flags (to the
    # device for those kernels), so the flags go in before loading ...
    groups = [{**saved, **{k: v for k, v in keep.items() if k != "lr"}}
              for saved, keep in zip(state["param_groups"], owned)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for group, keep in zip(optimizer.param_groups, owned):
        group.update(keep)  # ... and the rate holder after (loading deep-copies the groups)


def resolve_resume(args):
    """The checkpoint path to resume from (None for a fresh run); 'auto' finds <out-dir>/last.pt."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = os.path.join(args.out_dir, "last.pt")
        return path if os.path.exists(path) else None
    if os.path.isdir(args.resume):
        raise UsageError(f"--resume '{args.resume}' is a directory; pass its checkpoint "
                         f"({os.path.join(args.resume, 'last.pt')}) or --resume auto --out-dir {args.resume}")
    if not os.path.isfile(args.resume):
        raise UsageError(f"--resume: checkpoint '{args.resume}' does not exist")
    return args.resume


# ----------------------------------------------------------------------------------------------
# Stopping on SIGINT/SIGTERM
# ----------------------------------------------------------------------------------------------
# Under torchrun a signal can reach the processes at different steps, or only one of them; they
# compare flags every STOP_CHECK_STEPS steps (one small all-reduce and host synchronisation) and
# at every epoch end, and stop together, so a checkpoint only holds a step that every process ran.
STOP_CHECK_STEPS = 10


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a stop never lands mid-update."""

    def __init__(self, rt):
        self.rt, self.signal = rt, None
        self._previous = {}
        # torchrun forwards the signal it receives and SIGKILLs workers 30 s later; a worker may be
        # signalled twice (e.g. by Slurm and by torchrun), so there a repeat is not "stop now".
        self._escalate = "TORCHELASTIC_RUN_ID" not in os.environ

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            if self._escalate:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.signal = signum

    def __exit__(self, exc_type, *exc):
        # Leaving on an exception after a stop request means the process is exiting: a repeated
        # Ctrl-C must not raise KeyboardInterrupt inside the interpreter's shutdown (atexit) hooks.
        exiting = self.signal is not None and exc_type is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)
        return False

    def requested(self, step=None):
        """True when every process is to stop now: after step `step` (None: at an epoch end).

        Under torchrun a collective: all processes call it at the same steps, and a signal that
        reached any of them stops all of them, each then carrying that signal's number.
        """
        if not self.rt.distributed:
            return self.signal is not None
        if step is not None and (step + 1) % STOP_CHECK_STEPS:
            return False
        flag = torch.tensor(self.signal or 0, device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signal = int(flag) or None
        return self.signal is not None

    @property
    def exit_code(self):
        """128 + signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal


def interrupt(run, stop, epoch, step, stats=None):
    """Save the state after `step` iterations of `epoch` as last.pt, say how to resume, exit 130/143."""
    path = os.path.join(run.run_dir, "last.pt")
    for sig in (signal.SIGINT, signal.SIGTERM):  # a repeated Ctrl-C must not abort the save
        signal.signal(sig, signal.SIG_IGN)
    # Under torchrun every process reached this step (StopRequest.requested agreed on it): rank
    # 0's weights are everyone's, and its buffers are the ones DDP broadcasts at the next step.
    checkpoint = make_run_checkpoint(run, epoch, step, stats)  # a collective (the statistics' sums)
    if run.rt.is_main:
        atomic_save(checkpoint, path)
    if run.rt.distributed:
        dist.barrier()  # nobody exits (which makes torchrun stop the others) before the save is done
    name = signal.Signals(stop.signal).name
    print_main(run.rt, f"{name}: stopped at epoch {epoch + 1} step {step}; state saved to {path}; "
                       f"continue with: {resume_command(run.rt, path)}")
    run.metrics.close()
    sys.exit(stop.exit_code)


def resume_command(rt, path):
    """The command line that continues this run from `path`."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg == "--resume":
            skip = not skip and arg == "--resume"
            continue
        if not arg.startswith("--resume="):
            argv.append(arg)
    launcher = ["python"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        local = os.environ.get("LOCAL_WORLD_SIZE", rt.world_size)
        nodes = rt.world_size // int(local)
        launcher = ["torchrun", f"--nproc_per_node={local}"] + ([f"--nnodes={nodes} <rendezvous flags>"] if nodes > 1 else [])
    return " ".join([*launcher, os.path.basename(sys.argv[0]), *argv, "--resume", path])


def now():
    """Wall-clock seconds (after a device sync, so GPU work is included)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# CUDA-graph capture of a whole step
# ----------------------------------------------------------------------------------------------
class CapturedStep:
    """Runs a training step eagerly or, with CUDA graphs, captures it once and replays it.

    `core(*tensors)` is one whole optimisation step of the group (every forward, the losses and
    a paradigm's selection of teachers, one backward, every optimizer step, the statistics) written without
    host synchronisation: fixed shapes, no `.item()`, no Python branch on tensor values, learning
    rates held in device tensors (fused optimizers read them on the device). The first `warmup`
    calls run eagerly on a side stream (cuDNN autotuning, optimizer state allocation); the next
    call records the graph, and every later call copies its tensors into the graph's static
    inputs and replays it: one launch instead of thousands, no Python in the loop.
    """

    def __init__(self, core, *, enabled, warmup=3):
        self.core, self.enabled, self.warmup = core, enabled, warmup
        self.calls, self.graph, self.static_inputs, self.static_output = 0, None, None, None

    def __call__(self, *tensors):
        if not self.enabled:
            return self.core(*tensors)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                # capturable optimizers (Adam, AdamW) warn when stepped outside a capture: expected here
                warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                output = self.core(*tensors)
            torch.cuda.current_stream().wait_stream(side)
            return output
        if self.graph is None:
            self.static_inputs = [t.clone() for t in tensors]
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the torch loader's pin-memory thread) may
            # go on during the capture; the default global mode would abort it.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_output = self.core(*self.static_inputs)
        else:
            for static, tensor in zip(self.static_inputs, tensors):
                static.copy_(tensor, non_blocking=True)
        self.graph.replay()
        return self.static_output
