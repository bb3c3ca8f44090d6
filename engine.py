"""The loop every training script runs (in the shape of facebookresearch/deit's engine.py): one epoch's
batches (train_one_epoch), its statistics, evaluation, and logging an epoch (console, metrics.csv,
TensorBoard).

engine.py knows no paradigm: a training step returns a dict of named statistics, and the names
become metrics.csv columns (`train_<name>`), TensorBoard tags and the epoch line. The run itself
(its setup, its epochs, its final files) is lifecycle.py's.
"""
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import stopping
from capture import StepSums
from errors import RunFailure
from models import unwrap
from perturb import bn_statistics_kept
from utils import all_reduce_sum, autocast, sync_replicas, to_input


# ----------------------------------------------------------------------------------------------
# One epoch of training
# ----------------------------------------------------------------------------------------------
def train_one_epoch(run, epoch):
    """Train the steps of `epoch` that this invocation has to train; returns their EpochStats.

    Each step, in this order: the learning rate of the global step; the step's arguments (run.batch:
    the perturbation of one network's batch every --perturb-every steps, mixup, ...) with the BatchNorm
    statistics of a perturbed network kept out of the batch; the paradigm's step; the --model-ema update
    (after those statistics are restored); the --log-interval line; a stop request. A signal (SIGINT,
    SIGTERM, SIGHUP) saves last.pt after the step it arrived in and exits with its code (130, 143, 129).
    """
    stats = epoch_stats(run, epoch)
    done = run.start_step if epoch == run.start_epoch else 0  # steps of the epoch trained so far
    try:
        for step, (images, labels) in batches(run, epoch):
            global_step = epoch * run.steps_per_epoch + step
            run.schedule.step(global_step)
            arguments, perturbed = run.batch(run, global_step, images, labels)
            with bn_statistics_kept(perturbed):
                stats.add(run.train_step(*arguments))
            run.ema.update(run.nets)
            log_step(run, epoch, step, stats)
            done = step + 1
            if run.stop.requested(step):
                sys.exit(stopping.save_and_stop(run, run.stop, epoch, step + 1, stats))
    except RuntimeError as error:
        if "DataLoader worker" not in str(error):
            raise
        raise loader_failure(run, epoch, done, stats, error) from None
    return stats


def loader_failure(run, epoch, done, stats, error):
    """A DataLoader worker that died (killed by the system when memory runs out, most often): last.pt saved
    after the last step trained (one process), and the RunFailure (exit code 1) that says so in one line."""
    reason = " ".join(str(error).split())[:160]
    if run.rt.distributed:  # the other processes are elsewhere in the loop: no collective save is possible
        return RunFailure(f"a DataLoader worker died in epoch {epoch + 1} ({reason}); nothing of this epoch was saved: "
                          f"continue with --resume auto, with fewer --workers or a smaller --batch-size", exit_code=1)
    path = run.checkpoints.save_interrupted(epoch, done, stats)
    run.metrics.close()
    return RunFailure(f"a DataLoader worker died in epoch {epoch + 1} ({reason}); the {done} steps trained are saved in "
                      f"{path}: continue with --resume auto, with fewer --workers or a smaller --batch-size", exit_code=1)


class EpochStats:
    """Sums of each named per-network statistic over an epoch's steps, kept on the device (read
    once per epoch: no host synchronisation per step). A step returns {name: tensor of shape (n,)}
    (or a scalar for one network); the epoch's value of a statistic is its mean over steps.

    The sums are a capture.StepSums: with --cuda-graphs the run's own (its captured step adds its
    statistics there itself, and add() only counts the step), otherwise one of the epoch's."""

    def __init__(self, rt, first_step=0, sums=None):
        self.rt, self.steps = rt, 0
        self.step_sums = StepSums(rt.device) if sums is None else sums
        self.step_sums.restart(first_step)  # the epoch's first step trained here (> 0 on a mid-epoch resume)
        self.captured = sums is not None

    @property
    def sums(self):
        """{name: per-network sums (float64, on the device)}."""
        return self.step_sums.sums

    @property
    def first_nonfinite(self):
        """Per network: the first step of the epoch with a NaN/inf statistic, -1 if none (None before a step)."""
        return self.step_sums.first_nonfinite

    def add(self, stats):
        """Add one step's statistics (a dict of device tensors), or count a step whose captured graph
        added them to the bound StepSums itself."""
        if isinstance(stats, StepSums):
            if stats is not self.step_sums:
                raise ValueError("a step that sums its own statistics needs EpochStats(rt, sums=its StepSums)")
        else:
            self.step_sums.add(stats)
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
        self.step_sums.load({name: (sums * keep).to(self.rt.device) for name, sums in state["sums"].items()})
        self.steps = int(state["steps"])


def epoch_stats(run, epoch):
    """The statistics of `epoch`, empty, or on the epoch a mid-epoch resume continues, restored
    from the checkpoint (the sums of the steps trained before the interruption)."""
    first_step = run.start_step if epoch == run.start_epoch else 0
    stats = EpochStats(run.rt, first_step, sums=run.step_sums)
    run.step_log = (0, None)
    if first_step:
        stats.load_state_dict(run.resumed["stats"])
        run.step_log = (stats.steps, read_sums(stats))
    return stats


def batches(run, epoch):
    """Yield (step, batch) of the training loader for the steps of `epoch` this invocation still has to
    train.

    On a mid-epoch resume the already-trained steps are drawn from the loader and dropped, so its
    random stream stays exact. Afterwards run.train_seconds holds the wall time of the epoch's steps.
    """
    loader = run.loaders[0]
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
    """After step `step` of `epoch`: every --log-interval steps one console line with the epoch's mean loss so
    far per network, the learning rate, images/s since the last line and the time left in the epoch and the
    run (training steps only); every --log-every steps the step scalars (step_scalars). Either reads the device
    once (the statistics' sums, which waits for the queued steps); between them nothing is read."""
    interval, every, done = log_interval(run.args), getattr(run.args, "log_every", 0), step + 1
    global_step = epoch * run.steps_per_epoch + done
    line, scalars = interval and done % interval == 0, every and global_step % every == 0 and run.metrics.logs_steps
    if not (run.rt.is_main and (line or scalars)):
        return
    sums = read_sums(stats)  # the one read
    # with --cuda-graphs a rate is a device tensor: its value was written by the host this step
    lrs = [float(opt.param_groups[0]["lr"]) if opt is not None else 0.0 for opt in run.optimizers]
    if scalars:
        step_scalars(run, global_step, stats.steps, sums, lrs)
    if not line:
        return
    loss = (sums["loss"] / max(stats.steps, 1)).tolist() if "loss" in sums else []
    seconds = time.perf_counter() - run.interval["time"]
    per_step = seconds / max(done - run.interval["step"], 1)
    images = (done - run.interval["step"]) * run.args.batch_size * run.rt.world_size / max(seconds, 1e-9)
    epoch_left = (run.steps_per_epoch - done) * per_step
    run_left = epoch_left + (run.args.epochs - epoch - 1) * run.steps_per_epoch * per_step
    print(f"epoch {epoch + 1}/{run.args.epochs} step {done}/{run.steps_per_epoch} | "
          f"loss {' '.join(f'{v:.4f}' for v in loss)} | lr {' '.join(dict.fromkeys(f'{lr:.4g}' for lr in lrs))} | "
          f"{images:.0f} img/s | ETA epoch {clock(epoch_left)}, run {clock(run_left)}", flush=True)
    run.interval = {"step": done, "time": time.perf_counter()}


def read_sums(stats):
    """This process's sums of the epoch's statistics on the host, {name: per-network float64 tensor}: one copy."""
    if not stats.sums:
        return {}
    return dict(zip(stats.sums, torch.stack([value.reshape(-1) for value in stats.sums.values()]).cpu()))


def step_scalars(run, global_step, steps, sums, lrs):
    """The --log-every scalars at `global_step` (the run's steps so far): each statistic's mean over this
    process's steps since the last ones (step/NAME/NETWORK) and each network's learning rate at this step
    (step/lr/NETWORK; a branched network's members share their optimizer's)."""
    last_steps, last_sums = run.step_log
    if steps <= last_steps:
        return
    values = {}
    for name, total in sums.items():
        mean = (total - (last_sums[name] if last_sums else 0)) / (steps - last_steps)
        values.update({f"step/{name}/{label}": float(v) for label, v in zip(run.labels, mean.tolist())})
    values.update({f"step/lr/{label}": lrs[min(i, len(lrs) - 1)] for i, label in enumerate(run.labels)})
    run.metrics.write_step(global_step, values)
    run.step_log = (steps, sums)


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


def evaluate_epoch(run, epoch):
    """{"val": ..., "test": ...}: per-network (and ensemble) loss/acc/top5 after `epoch`; both None
    on an epoch that --eval-every skips (the last epoch, and the last of this invocation, never are)."""
    _, val_loader, test_loader = run.loaders
    sync_replicas(run.nets, run.rt, epoch)
    if run.ema:  # each process averaged its own BatchNorm statistics: rank 0's are evaluated and saved
        sync_replicas(run.ema.modules(run.nets), run.rt, epoch)
    if (epoch + 1) % getattr(run.args, "eval_every", 1) and not last_epoch_here(run, epoch):
        return {"val": None, "test": None}
    shown = progress_enabled(run.args, run.rt)
    results, groups = {}, [("", run.nets)] + ([("ema ", run.ema.modules(run.nets))] if run.ema else [])
    for prefix, nets in groups:  # the networks, then their --model-ema averages
        for split, loader in (("val", val_loader), ("test", test_loader)):
            results[prefix + split] = None if loader is None else evaluate(
                nets, progress(loader, shown, desc=prefix + ("validation" if split == "val" else split)), run.rt,
                outputs=run.outputs or group_outputs, members=len(run.labels))
    return results


def log_epoch(run, epoch, stats, evals):
    """Write epoch `epoch`'s rows (one per network, plus the ensemble) to metrics.csv, TensorBoard
    and the console; returns them. Training statistics that became NaN or infinite end the run here:
    RunFailure (exit code 3) after the rows are written, before anything of the epoch is saved."""
    # Only the steps this invocation ran (a resumed epoch replays the others without training).
    steps = run.steps_per_epoch - (run.start_step if epoch == run.start_epoch else 0)
    seconds = run.train_seconds
    lrs = run.schedule.rates((epoch + 1) * run.steps_per_epoch - 1)   # the rate of the epoch's last step
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
    print_main(run.rt, *(epoch_line(epoch + 1, run.args.epochs, row, subset=bool(run.info.eval_subset))
                         for row in rows + averages))
    run.last_rows = run.checkpoints.last_rows = rows
    run.last_ema_rows = run.checkpoints.last_ema_rows = averages
    if diverged(rows):
        raise divergence(run, epoch, stats, rows)
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


def epoch_line(epoch, epochs, row, subset=False):
    """One console summary line for one network (or the ensemble) after an epoch; with `subset` (--eval-subset)
    its accuracies are marked with a * as a subset's."""
    parts = [f"epoch {epoch:>3}/{epochs}", f"{row['net']:<18}"]
    if "lr" in row:
        parts.append(f"lr {row['lr']:.4g}")
    train = [f"{key[6:]} {value:.2f}%" if key.endswith("acc") else f"{key[6:]} {value:.4f}"
             for key, value in row.items() if key.startswith("train_")]
    if train:
        parts.append("train " + " ".join(train))
    parts += [f"{split}{'*' if subset else ''} {row[f'{split}_acc']:.2f}%" for split in ("val", "test") if f"{split}_acc" in row]
    if "epoch_time_s" in row:
        parts.append(f"{row['epoch_time_s']:.1f}s {row['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def print_main(rt, *lines):
    """Print on the main process only."""
    if rt.is_main:
        for line in lines:
            print(line, flush=True)
