"""Plain helpers that the training scripts' loops call: start the run, the epoch's batches and
statistics, evaluation, logging (console, metrics.csv, TensorBoard), stop requests and finishing.

engine.py knows no paradigm: a training step returns a dict of named statistics, and the names
become metrics.csv columns (`train_<name>`), TensorBoard tags and the epoch line. It never ends
the process: every way out of a loop is a line in the script's loop.
"""
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import torch.nn.functional as F

import checkpoints
from capture import StepSums
from flags import RunComplete, RunFailure, UsageError
from metrics import MetricsLog
from models.weights import net_labels
from utils import all_reduce_sum, autocast, sync_replicas, to_input, unwrap


# ----------------------------------------------------------------------------------------------
# The run: what one invocation of a script carries from epoch to epoch
# ----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Plain data: the run's settings, its group, where it starts and what it has written."""
    args: object
    rt: object
    script: str
    names: list
    info: object
    nets: list
    optimizers: list
    steps_per_epoch: int
    run_dir: str
    checkpoints: object          # checkpoints.Checkpoints of run_dir
    metrics: object = None       # MetricsLog
    labels: list = field(default_factory=list)     # the members' row labels: the networks, or a network's branches
    models: list = field(default_factory=list)     # each member's architecture
    outputs: object = None                         # evaluation: evaluate's `outputs` for the members (None: group_outputs)
    start_epoch: int = 0         # epochs completed before this invocation
    start_step: int = 0          # steps of epoch `start_epoch` completed before it (mid-epoch resume)
    resumed: dict = field(default_factory=dict)    # the resumed checkpoint's "state" (fresh run: empty)
    last_rows: list = field(default_factory=list)  # the latest epoch's metrics rows
    lock: tuple = None           # (path, content) of the run directory's lock, held by the main process
    train_seconds: float = float("nan")            # wall time of the latest epoch's training steps
    last_ema_rows: list = field(default_factory=list)  # the latest epoch's rows of the --model-ema averages
    interval: dict = field(default_factory=dict)   # the --log-interval line's last (step, time)
    step_sums: object = None     # with --cuda-graphs, the StepSums its captured step adds to (capture_step)


def start_run(args, script, group, rt, info, nets, optimizers, *, steps_per_epoch, state, members=None,
              outputs=None):
    """Open the run directory and, with --resume, restore the group, its optimizers and `state` (the
    script's own objects with state_dict()/load_state_dict()) from the checkpoint; returns the RunState.

    The run's members, one metrics row each (plus an ensemble row when there are several), are its
    networks; a branched network names its branches instead: members = [(label, architecture), ...],
    the first the deployed one (best.pt selects on it), and `outputs` evaluates them (engine.evaluate).
    """
    args.world_size = rt.world_size
    resume = checkpoints.resolve_resume(args)
    run_dir = args.out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else
                               checkpoints.default_run_dir(script, args.dataset, group.names))
    saver = checkpoints.Checkpoints(run_dir, script=script, args=args, info=info, names=group.names, nets=nets,
                                    optimizers=optimizers, rt=rt, state=state)
    members = members or list(zip(net_labels(group.names), group.names))
    run = RunState(args, rt, script, list(group.names), info, nets, optimizers, steps_per_epoch, run_dir, saver,
                   labels=[label for label, _ in members], models=[model for _, model in members], outputs=outputs)
    if resume:
        try:
            run.start_epoch, run.start_step, run.resumed = saver.restore(resume)
        except RunComplete as complete:
            raise finish_complete_run(run_dir, complete) if rt.is_main else complete from None
    if rt.distributed:
        check_same_resume_point(run)
    if rt.is_main:
        run.lock = checkpoints.prepare_run_dir(run_dir, fresh=resume is None, args=args)
        saver.copy_resumed_best()
        resumed = {"time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "checkpoint": resume,
                   "epoch": run.start_epoch, "step": run.start_step} if resume else None
        checkpoints.save_args(args, run_dir, script, resumed=resumed)
    run.metrics = MetricsLog(run_dir, rt, run.start_epoch, resumed=resume is not None)
    print_main(rt, describe_run(run, resume), *describe_nets(run, group, resume))
    return run


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


def describe_nets(run, group, resume):
    """One startup line per network: parameters, where its weights come from, its optimizer and peak rate."""
    lines = []
    for i, (label, net, optimizer) in enumerate(zip(run.labels, run.nets, run.optimizers)):
        params = sum(p.numel() for p in unwrap(net).parameters())
        init = group.init.get(i)
        start = ("weights of the checkpoint" if resume else
                 f"initialised from {init[0]}{'@' + init[1] if init[1] else ''}" if init else "random initial weights")
        if optimizer is None:
            training = "frozen (--freeze: no optimizer, eval mode)"
        else:
            first = optimizer.param_groups[0]
            training = f"{type(optimizer).__name__} peak lr {float(first['lr']):.4g}, weight decay {first['weight_decay']:g}"
        lines.append(f"  {label}: {params / 1e6:.2f}M parameters, {start}, {training}")
    return lines


def print_main(rt, *lines):
    """Print on the main process only."""
    if rt.is_main:
        for line in lines:
            print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# One epoch: its batches and statistics
# ----------------------------------------------------------------------------------------------
class EpochStats:
    """Sums of each named per-network statistic over an epoch's steps, kept on the device (read
    once per epoch: no host synchronisation per step). A step returns {name: tensor of shape (n,)}
    (or a scalar for one network); the epoch's value of a statistic is its mean over steps.

    Bound to a StepSums (`sums`, with --cuda-graphs) it restarts them and reads them as its own sums:
    the captured step adds its statistics there itself, and add() only counts the step."""

    def __init__(self, rt, first_step=0, sums=None):
        self.rt, self.steps, self.restored_steps = rt, 0, 0
        self.first_step = first_step  # the epoch's first step trained here (> 0 on a mid-epoch resume)
        self.first_nonfinite = None   # per network: the first step with a NaN/inf statistic, -1 if none
        self.step_sums = sums
        if sums is not None:
            sums.restart(first_step)
        self.sums = {} if sums is None else sums.sums

    def add(self, stats):
        """Add one step's statistics (a dict of device tensors), or count a step whose captured graph
        added them to the bound StepSums itself."""
        if isinstance(stats, StepSums):
            if stats is not self.step_sums:
                raise ValueError("a step that sums its own statistics needs EpochStats(rt, sums=its StepSums)")
            self.first_nonfinite = stats.first_nonfinite
            self.steps += 1
            return
        values = [value.detach().to(torch.float64).reshape(-1) for value in stats.values()]
        for name, value in zip(stats, values):
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        # Divergence is noted on the device (no host read per step) and read at the epoch's end.
        bad = ~torch.isfinite(torch.stack(values)).all(0)
        if self.first_nonfinite is None:
            self.first_nonfinite = torch.full_like(bad, -1, dtype=torch.int64)
        step = self.first_step + self.steps - self.restored_steps  # this step's index in its epoch
        self.first_nonfinite = torch.where(bad & (self.first_nonfinite < 0), step, self.first_nonfinite)
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
        sums = {name: (sums * keep).to(self.rt.device) for name, sums in state["sums"].items()}
        if self.step_sums is None:
            self.sums = sums
        else:  # into the buffers the captured step adds to
            self.step_sums.load(sums)
        self.steps = self.restored_steps = int(state["steps"])


def epoch_stats(run, epoch):
    """The statistics of `epoch`, empty, or on the epoch a mid-epoch resume continues, restored
    from the checkpoint (the sums of the steps trained before the interruption)."""
    first_step = run.start_step if epoch == run.start_epoch else 0
    stats = EpochStats(run.rt, first_step, sums=run.step_sums)
    if first_step:
        stats.load_state_dict(run.resumed["stats"])
    return stats


def batches(run, loader, epoch):
    """Yield (step, batch) for the steps of `epoch` this invocation still has to train.

    On a mid-epoch resume the already-trained steps are drawn from the loader and dropped, so its
    random stream stays exact. Afterwards run.train_seconds holds the wall time of the epoch's steps.
    """
    loader.set_epoch(epoch)
    skip = run.start_step if epoch == run.start_epoch else 0
    start = now()
    run.interval = {"step": skip, "time": time.perf_counter()}
    images = run.args.batch_size * run.rt.world_size  # the bar counts images, so its rate is images/s
    for step, batch in enumerate(progress(loader, progress_enabled(run.args, run.rt), desc=f"epoch {epoch + 1}",
                                          unit="img", unit_scale=images)):
        if step >= skip:
            yield step, batch
    run.train_seconds = now() - start


# Steps between two --log-interval lines when stdout is not a terminal (a batch job's log file).
LOG_INTERVAL = 50


def log_interval(args):
    """--log-interval, or its default: LOG_INTERVAL steps when stdout is not a terminal, 0 (off) on one."""
    if getattr(args, "log_interval", None) is not None:
        return args.log_interval
    return 0 if sys.stdout.isatty() else LOG_INTERVAL


def log_step(run, epoch, step, stats):
    """After step `step` of `epoch`, every --log-interval steps: one line with the epoch's mean loss so
    far per network, the learning rate, images/s since the last line and the time left in the epoch
    and the run (training steps only). A line reads the device once (the loss sums, which waits for
    the queued steps); between lines nothing is read."""
    interval, done = log_interval(run.args), step + 1
    if not (run.rt.is_main and interval and done % interval == 0):
        return
    loss = (stats.sums["loss"] / max(stats.steps, 1)).tolist() if "loss" in stats.sums else []  # the one read
    seconds = time.perf_counter() - run.interval["time"]
    per_step = seconds / max(done - run.interval["step"], 1)
    images = (done - run.interval["step"]) * run.args.batch_size * run.rt.world_size / max(seconds, 1e-9)
    # with --cuda-graphs a rate is a device tensor: its value was written by the host this step
    lrs = [float(opt.param_groups[0]["lr"]) if opt is not None else 0.0 for opt in run.optimizers]
    epoch_left = (run.steps_per_epoch - done) * per_step
    run_left = epoch_left + (run.args.epochs - epoch - 1) * run.steps_per_epoch * per_step
    print(f"epoch {epoch + 1}/{run.args.epochs} step {done}/{run.steps_per_epoch} | "
          f"loss {' '.join(f'{v:.4f}' for v in loss)} | lr {' '.join(dict.fromkeys(f'{lr:.4g}' for lr in lrs))} | "
          f"{images:.0f} img/s | ETA epoch {clock(epoch_left)}, run {clock(run_left)}", flush=True)
    run.interval = {"step": done, "time": time.perf_counter()}


def clock(seconds):
    """Seconds as H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


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


def now():
    """Wall-clock seconds (after a device sync, so GPU work is included)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def topk_correct(logits, labels, ks=(1, 5)):
    """Number of samples whose label is among the top-k logits, for each k (device tensor)."""
    k_max = min(max(ks), logits.shape[-1])
    top = logits.topk(k_max, dim=-1).indices
    hits = top == labels[..., None]
    return torch.stack([hits[..., :min(k, k_max)].any(-1).sum(-1) for k in ks], dim=-1)


def group_outputs(nets, images):
    """The default evaluation outputs: each network's logits (n, B, C) and the group's averaged
    softmax (B, C), its ensemble."""
    logits = torch.stack([net(images) for net in nets]).float()
    return logits, logits.softmax(-1).mean(0)


@torch.no_grad()
def evaluate(nets, loader, rt, outputs=group_outputs, members=None):
    """Loss, top-1 and top-5 (%) of each member and of the ensemble: a list of k + 1 dicts.

    outputs(nets, images) -> (logits of the k = `members` members (k, B, C), ensemble probabilities
    (B, C)); by default the members are the networks (k = len(nets)) and the ensemble their averaged
    softmax, while a branched network (ONE, OKDDip) evaluates each branch and its own ensemble.
    """
    # The plain modules: DDP's forward would broadcast buffers, a collective that hangs when the
    # unpadded evaluation shards give the processes different numbers of batches.
    nets = [unwrap(net) for net in nets]
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    k = len(nets) if members is None else members
    sums = torch.zeros(k + 1, 4, device=rt.device, dtype=torch.float64)  # loss, top1, top5, count
    for images, labels in loader:
        with autocast(rt):
            logits, probs = outputs(nets, to_input(images, rt))
        logits, probs = logits.float(), probs.float()
        sums[:k, 0] += torch.stack([F.cross_entropy(z, labels, reduction="sum") for z in logits])
        sums[k, 0] += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        sums[:k, 1:3] += topk_correct(logits, labels)
        sums[k, 1:3] += topk_correct(probs, labels)
        sums[:, 3] += labels.numel()
    all_reduce_sum(sums, rt)
    sums = sums.tolist()
    for net, mode in zip(nets, modes):
        net.train(mode)
    return [{"loss": s[0] / max(s[3], 1), "acc": 100 * s[1] / max(s[3], 1), "top5": 100 * s[2] / max(s[3], 1)}
            for s in sums]


# ----------------------------------------------------------------------------------------------
# The end of an epoch: evaluation, logging, divergence, --stop-after
# ----------------------------------------------------------------------------------------------
def last_epoch_here(run, epoch):
    """True when `epoch` is the run's last, or this invocation's last (--stop-after)."""
    return epoch + 1 == run.args.epochs or (
        run.args.stop_after is not None and epoch + 1 - run.start_epoch >= run.args.stop_after)


def evaluate_epoch(run, val_loader, test_loader, epoch):
    """{"val": ..., "test": ...}: per-network (and ensemble) loss/acc/top5 after `epoch`; both None
    on an epoch that --eval-every skips (the last epoch, and the last of this invocation, never are)."""
    sync_replicas(run.nets, run.rt, epoch)
    if (epoch + 1) % getattr(run.args, "eval_every", 1) and not last_epoch_here(run, epoch):
        return {"val": None, "test": None}
    shown = progress_enabled(run.args, run.rt)
    ema = run.checkpoints.state.get("ema")
    results, groups = {}, [("", run.nets)] + ([("ema ", ema.modules(run.nets))] if ema else [])
    for prefix, nets in groups:  # the networks, then their --model-ema averages
        for split, loader in (("val", val_loader), ("test", test_loader)):
            results[prefix + split] = None if loader is None else evaluate(
                nets, progress(loader, shown, desc=prefix + ("validation" if split == "val" else split)), run.rt,
                outputs=run.outputs or group_outputs, members=len(run.labels))
    return results


def log_epoch(run, epoch, stats, evals, schedule):
    """Write epoch `epoch`'s rows (one per network, plus the ensemble) to metrics.csv, TensorBoard
    and the console; returns them."""
    # Only the steps this invocation ran (a resumed epoch replays the others without training).
    steps = run.steps_per_epoch - (run.start_step if epoch == run.start_epoch else 0)
    seconds = run.train_seconds
    lrs = schedule.rates((epoch + 1) * run.steps_per_epoch - 1)   # the rate of the epoch's last step
    train = stats.means()
    rows, members = [], len(run.labels)
    for i, label in enumerate(run.labels + (["ensemble"] if members > 1 else [])):
        row = {"epoch": epoch + 1, "net": label, "model": run.models[i] if i < members else "+".join(run.names)}
        if i < members:
            row["lr"] = lrs[min(i, len(lrs) - 1)]  # a branched network's branches share its optimizer
            row.update({f"train_{name}": value for name, value in train[i].items()})
        row.update(eval_columns(evals, i))
        if i < members:
            row["epoch_time_s"] = seconds
            row["images_per_s"] = steps * run.args.batch_size * run.rt.world_size / seconds
        rows.append(row)
    # --model-ema: a row for each average (and for their ensemble), evaluated only
    averages = [{"epoch": row["epoch"], "net": f"ema_{row['net']}", "model": row["model"], **eval_columns(evals, i, "ema ")}
                for i, row in enumerate(rows)] if evals.get("ema test") is not None else []
    run.metrics.write(epoch + 1, rows + averages)
    print_main(run.rt, *(epoch_line(epoch + 1, run.args.epochs, row) for row in rows + averages))
    run.last_rows = run.checkpoints.last_rows = rows
    run.last_ema_rows = averages
    return rows


def eval_columns(evals, i, prefix=""):
    """Member i's evaluation columns (val_acc, test_loss, ...) of evaluate_epoch's results under `prefix`."""
    return {f"{split}_{name}": value for split in ("val", "test") if evals.get(prefix + split) is not None
            for name, value in evals[prefix + split][i].items()}


def diverged(rows):
    """True when a network's training statistics in the epoch's rows are NaN or infinite."""
    return any(not math.isfinite(value) for row in rows for key, value in row.items() if key.startswith("train_"))


def divergence(run, epoch, stats, rows):
    """The one-line RunFailure (exit code 3) of a run whose training statistics became non-finite in
    `epoch`; nothing of that epoch is saved."""
    i = next(i for i, row in enumerate(rows)
             if any(not math.isfinite(v) for k, v in row.items() if k.startswith("train_")))
    first = int(stats.first_nonfinite[i]) if stats.first_nonfinite is not None else -1
    last = os.path.join(run.run_dir, "last.pt")
    kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
    run.metrics.close()
    return RunFailure(f"training diverged: {run.labels[i]}'s statistics became non-finite in epoch {epoch + 1}"
                      + (f" (first at step {first})" if first >= 0 else "") + f"; nothing of this epoch was saved, "
                      f"{kept}; lower --lr or check the flags", exit_code=3)


def stop_after(run, epoch):
    """True when this invocation ends after `epoch` (--stop-after N: N epochs per invocation)."""
    return run.args.stop_after is not None and epoch + 1 - run.start_epoch >= run.args.stop_after


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


def finish(run):
    """Print and save (results.json) the last epoch's and the best-validation numbers; unlock the run directory."""
    run.metrics.close()
    if run.lock:
        checkpoints.unlock_run_dir(*run.lock)
    if not run.last_rows:
        return None
    results = results_record(run.run_dir, run.script, run.info.name, run.info.synthetic, run.last_rows,
                             run.checkpoints.best, len(run.nets))
    if run.last_ema_rows:
        results["ema"] = [{"net": row["net"], "model": row["model"], "final_test_acc": row["test_acc"],
                           "final_val_acc": row.get("val_acc")} for row in run.last_ema_rows]
    if run.rt.is_main:
        checkpoints.save_json(results, os.path.join(run.run_dir, "results.json"))
        print_main(run.rt, "final test accuracy (last epoch): " + ", ".join(
            f"{e['net']} {e['final_test_acc']:.2f}%" for e in results["networks"]))
    return results


def results_record(run_dir, script, dataset, synthetic, rows, best, nets):
    """results.json's content: the last epoch's `rows` (one per member, then the ensemble) and the
    best-validation record of the `nets` networks."""
    results = {"run_dir": run_dir, "script": script, "dataset": dataset, "synthetic": synthetic,
               "epochs": rows[0]["epoch"], "networks": []}
    for i, row in enumerate(rows):
        entry = {"net": row["net"], "model": row["model"], "final_test_acc": row["test_acc"],
                 "final_val_acc": row.get("val_acc")}
        if i < nets and row.get("val_acc") is not None:
            entry.update(best_val_acc=best["val_acc"][i], best_epoch=best["epoch"][i],
                         test_acc_at_best_val=best["test_acc"][i])
        results["networks"].append(entry)
    return results


def finish_complete_run(run_dir, complete):
    """--resume auto on a complete run whose results.json is missing (killed after its last
    checkpoint): write it from last.pt and metrics.csv, so that finishing is idempotent."""
    ckpt, path = complete.checkpoint, os.path.join(run_dir, "results.json")
    if ckpt is None or os.path.exists(path):
        return complete
    rows = ckpt["state"].get("rows")  # the last epoch's rows, as finish() would have written them
    if not rows:
        return UsageError(f"{complete}; its results.json is missing and its last.pt holds no metrics rows to write it from")
    checkpoints.save_json(results_record(run_dir, ckpt["script"], ckpt["dataset"], ckpt["dataset"] == "fake", rows,
                                         ckpt["state"]["best"], len(ckpt["nets"])), path)
    return RunComplete(f"{complete}; its results.json was missing and is written now")
