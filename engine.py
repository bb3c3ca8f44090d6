"""The run around a script's training step: the shared epoch loop, per-epoch evaluation, the run
directory (metrics.csv, TensorBoard, console), checkpoints, exact resume and interruption.
The paradigm itself (which networks learn from which) stays in each training script."""
import csv
import datetime
import json
import os
import random
import signal
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from utils import StepStats, UsageError, evaluate, sync_replicas, unwrap

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Run directory, metrics CSV, TensorBoard, console
# ----------------------------------------------------------------------------------------------
def net_labels(names):
    """Unique display labels: net0_resnet32, net1_vit_tiny, ..."""
    return [f"net{i}_{name}" for i, name in enumerate(names)]


def default_run_dir(script, args, names):
    """runs/<script>-<dataset>-<models>-<time>."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{script}-{args.dataset}-{'-'.join(names)}-{stamp}")


class RunLogger:
    """metrics.csv (one row per epoch per network, plus the ensemble), TensorBoard and the console."""

    COLUMNS = ["epoch", "net", "model", "lr", "train_loss", "train_ce", "train_kd", "train_acc",
               "leader_share", "teachers", "val_loss", "val_acc", "val_top5", "test_loss", "test_acc",
               "test_top5", "epoch_time_s", "images_per_s"]

    def __init__(self, run_dir, rt, start_epoch):
        self.run_dir, self.enabled = run_dir, rt.is_main
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._drop_rows_from(start_epoch)
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 needs it
        self.writer = SummaryWriter(run_dir, purge_step=start_epoch + 1 if start_epoch else None)

    def _drop_rows_from(self, epoch):
        """On resume, forget rows of epochs that will be trained again (no duplicates)."""
        if not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epoch]
        def write(f):
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

        atomic_write(self.csv_path, write, mode="w")

    def log_epoch(self, epoch, rows):
        """Append this epoch's rows (dicts keyed by COLUMNS) and mirror them to TensorBoard."""
        if not self.enabled:
            return
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k)) for k in self.COLUMNS})
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            for key, value in row.items():
                if key not in ("epoch", "net", "model") and isinstance(value, (int, float)):
                    split, _, metric = key.partition("_")
                    tag = f"{split}/{metric}/{row['net']}" if metric else f"{key}/{row['net']}"
                    self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def print(self, *lines):
        """Print on the main process only."""
        if self.enabled:
            for line in lines:
                print(line, flush=True)

    def close(self):
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()


def _fmt(value):
    """CSV cell: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def epoch_line(epoch, epochs, row):
    """One console summary line for one network (or the ensemble) after an epoch."""
    parts = [f"epoch {epoch:>3}/{epochs}", f"{row['net']:<18}"]
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.4g}")
    if row.get("train_loss") is not None:
        train = f"train loss {row['train_loss']:.4f}"
        if row.get("train_kd") is not None:
            train += f" (ce {row['train_ce']:.4f} kd {row['train_kd']:.4f})"
        parts.append(train + f" acc {row['train_acc']:.2f}%")
    if row.get("leader_share") is not None:
        parts.append(f"lead {row['leader_share']:.2f} teachers {row['teachers']:.2f}")
    for split in ("val", "test"):
        if row.get(f"{split}_acc") is not None:
            parts.append(f"{split} {row[f'{split}_acc']:.2f}%")
    if row.get("epoch_time_s") is not None:
        parts.append(f"{row['epoch_time_s']:.1f}s {row['images_per_s']:.0f} img/s")
    return " | ".join(parts)


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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


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
    return ckpt


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
            "optimizers": [opt.state_dict() for opt in optimizers],
            "rng": rng_state(rt), "extra": extra or {}}


# Flags that fix which images each step sees: a resumed run (mid-epoch ones above all) needs them unchanged.
RESUME_MUST_MATCH = ("dataset", "batch_size", "train_subset", "split_seed")


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
                             f"this run has {getattr(args, flag, None)} (a resumed run must see the same data in the same batches)")
    if ckpt["args"].get("world_size", 1) != rt.world_size:
        raise UsageError(f"--resume '{path}' was written by {ckpt['args'].get('world_size', 1)} processes; "
                         f"resume it with the same number (this run has {rt.world_size})")
    for net, state in zip(nets, ckpt["nets"]):
        unwrap(net).load_state_dict(state)
    for optimizer, state in zip(optimizers, ckpt["optimizers"]):
        load_optimizer_state(optimizer, state)
    set_rng_state(ckpt["rng"], rt)


# The group settings that belong to this run, not to the run that wrote the checkpoint: the kernels
# (--cuda-graphs builds fused, capturable optimizers) and the rate holder (a device tensor that a
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
    if not os.path.isfile(args.resume):
        raise UsageError(f"--resume: checkpoint '{args.resume}' does not exist")
    return args.resume


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

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
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


def save_json(obj, path):
    """Write JSON atomically (see atomic_write)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def now():
    """Wall-clock seconds (after a device sync, so GPU work is included)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# One run's bookkeeping: resume, per-epoch evaluation/logging/checkpoints, interruption, summary
# ----------------------------------------------------------------------------------------------
class Run:
    """Bookkeeping of one training run around a loop that the script owns.

    Resumes from a checkpoint when asked, and after each epoch evaluates every network on the
    validation and test sets, writes metrics.csv/TensorBoard/console, `last.pt` (every epoch) and
    `best.pt` (each network at its best validation accuracy; the test set never selects).
    """

    def __init__(self, args, script, names, rt, data, nets, optimizers, val_loader, test_loader, steps_per_epoch):
        self.args, self.script, self.names, self.rt = args, script, list(names), rt
        self.info, self.nets, self.optimizers = data.info, nets, optimizers
        self.val_loader, self.test_loader = val_loader, test_loader
        self.steps_per_epoch = steps_per_epoch
        self.labels = net_labels(self.names)
        args.world_size = rt.world_size
        resume = resolve_resume(args)
        if args.out_dir:
            self.run_dir = args.out_dir
        elif resume:
            self.run_dir = os.path.dirname(os.path.abspath(resume))
        else:
            self.run_dir = default_run_dir(script, args, self.names)
        n = len(nets)
        self.best = {"val_acc": [-1.0] * n, "epoch": [0] * n, "test_acc": [None] * n}
        self.best_states = [None] * n
        self.start_epoch, self.start_step, self.extra = 0, 0, {}
        best_ckpt = None
        if resume:
            ckpt = load_checkpoint(resume)
            restore_checkpoint(ckpt, resume, args, self.info, self.names, nets, optimizers, rt)
            self.start_epoch, self.start_step, self.extra = ckpt["epoch"], ckpt["step"], ckpt["extra"]
            if self.start_epoch >= args.epochs:
                raise UsageError(f"--resume '{resume}' has already trained {self.start_epoch} of {args.epochs} epochs; "
                                 f"to train on, raise --epochs (the learning-rate schedule then spans the new total)")
            # The best weights so far sit next to the checkpoint (--out-dir may name a new directory).
            best_path = os.path.join(os.path.dirname(os.path.abspath(resume)), "best.pt")
            if os.path.exists(best_path):
                best_ckpt = load_checkpoint(best_path)
                self.best, self.best_states = self.extra.get("best", self.best), best_ckpt["nets"]
            elif max(self.extra.get("best", self.best)["val_acc"]) >= 0:
                print(f"note: no best.pt next to '{resume}': best-checkpoint selection restarts from this run", flush=True)
        if rt.distributed:
            # Every rank reads the checkpoint itself: one that finds none, or another one, would
            # train a different model in lockstep with the others.
            where = torch.tensor([self.start_epoch, self.start_step], device=rt.device)
            lowest, highest = where.clone(), where.clone()
            dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
            dist.all_reduce(highest, op=dist.ReduceOp.MAX)
            if not torch.equal(lowest, highest):
                raise UsageError(f"the processes found different checkpoints to resume from (epoch {self.start_epoch} "
                                 f"step {self.start_step} on rank {rt.rank}); the run directory must be on storage that every node reads")
        self.logger = RunLogger(self.run_dir, rt, self.start_epoch)
        if best_ckpt is not None and rt.is_main and not os.path.exists(os.path.join(self.run_dir, "best.pt")):
            atomic_save(best_ckpt, os.path.join(self.run_dir, "best.pt"))  # the new run directory is complete
        if rt.is_main:
            save_json(vars(args), os.path.join(self.run_dir, "args.json"))
        what = "resuming" if resume else "training"
        where = f" from epoch {self.start_epoch + 1}" + (f" step {self.start_step}" if self.start_step else "") if resume else ""
        synthetic = " (SYNTHETIC data: numbers mean nothing)" if self.info.synthetic else ""
        self.logger.print(f"{what} {', '.join(self.labels)} on {self.info.name}{synthetic}{where}: "
                          f"{self.info.train_size} train / {self.info.val_size} val / {self.info.test_size} test images, "
                          f"{self.info.in_chans}x{self.info.img_size}px, {self.info.num_classes} classes, device {rt.device}, "
                          f"amp {rt.amp_dtype}, {rt.world_size} process(es) x batch {args.batch_size} "
                          f"(global {args.batch_size * rt.world_size})"
                          + (f", lr x{rt.world_size} (--lr-scaling linear)" if rt.distributed and args.lr_scaling == "linear" else "")
                          + (", SyncBatchNorm" if rt.sync_bn else "") + f"; run dir {self.run_dir}")

    def resume_extra(self, key, default=None):
        """A piece of script state stored by a previous invocation (None on a fresh run)."""
        return self.extra.get(key, default)

    def skip_steps(self, epoch):
        """Iterations of `epoch` already done before an interrupted run was resumed."""
        return self.start_step if epoch == self.start_epoch else 0

    def _checkpoint(self, epoch, step, extra):
        extra = dict(extra or {}, best=self.best)
        return make_checkpoint(self.args, self.info, self.names, self.nets, self.optimizers, self.rt,
                               epoch=epoch, step=step, extra=extra)

    def end_epoch(self, epoch, train_rows, lrs, seconds, extra=None):
        """Evaluate, log and checkpoint after epoch `epoch` (0-based); returns the logged rows."""
        sync_replicas(self.nets, self.rt, epoch)
        val = evaluate(self.nets, self.val_loader, self.rt) if self.val_loader is not None else None
        test = evaluate(self.nets, self.test_loader, self.rt)
        # Only the steps this invocation ran (a resumed epoch replays the others without training).
        images = (self.steps_per_epoch - self.skip_steps(epoch)) * self.args.batch_size * self.rt.world_size
        rows = []
        for i, label in enumerate(self.labels + (["ensemble"] if len(self.nets) > 1 else [])):
            row = {"epoch": epoch + 1, "net": label, "model": self.names[i] if i < len(self.names) else "+".join(self.names)}
            if i < len(self.nets):
                row["lr"] = lrs[i]
                row.update({f"train_{k}": v for k, v in train_rows[i].items()})
                row.pop("train_leader", None), row.pop("train_teachers", None)
                if "leader" in train_rows[i]:
                    row["leader_share"], row["teachers"] = train_rows[i]["leader"], train_rows[i]["teachers"]
                row["epoch_time_s"], row["images_per_s"] = seconds, images / seconds
            for split, result in (("val", val), ("test", test)):
                if result is not None:
                    row.update({f"{split}_{k}": v for k, v in result[i].items()})
            rows.append(row)
        self.logger.log_epoch(epoch + 1, rows)
        self.logger.print(*(epoch_line(epoch + 1, self.args.epochs, row) for row in rows))
        if val is not None:
            improved = False
            for i in range(len(self.nets)):
                if val[i]["acc"] > self.best["val_acc"][i]:
                    self.best["val_acc"][i], self.best["epoch"][i] = val[i]["acc"], epoch + 1
                    self.best["test_acc"][i] = test[i]["acc"]
                    self.best_states[i] = {k: v.detach().cpu().clone() for k, v in unwrap(self.nets[i]).state_dict().items()}
                    improved = True
            if improved and self.rt.is_main:
                best = self._checkpoint(epoch + 1, 0, extra)
                best["nets"], best["optimizers"] = self.best_states, []
                atomic_save(best, os.path.join(self.run_dir, "best.pt"))
        self.final = rows
        if self.rt.is_main:
            atomic_save(self._checkpoint(epoch + 1, 0, extra), os.path.join(self.run_dir, "last.pt"))
        return rows

    def should_stop_after(self, epoch):
        """True when --stop-after epochs have run in this invocation."""
        return self.args.stop_after is not None and epoch + 1 - self.start_epoch >= self.args.stop_after

    def interrupt(self, stop, epoch, step, extra=None):
        """Save the state after `step` iterations of `epoch` as last.pt, say how to resume, exit 130/143."""
        path = os.path.join(self.run_dir, "last.pt")
        # Under torchrun every process reached this step (StopRequest.requested agreed on it): rank
        # 0's weights are everyone's, and its buffers are the ones DDP broadcasts at the next step.
        if self.rt.is_main:
            atomic_save(self._checkpoint(epoch, step, extra), path)
        if self.rt.distributed:
            dist.barrier()  # nobody exits (which makes torchrun stop the others) before the save is done
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg == "--resume":
                skip = not skip and arg == "--resume"
                continue
            if not arg.startswith("--resume="):
                argv.append(arg)
        launcher = ["python"]
        if "TORCHELASTIC_RUN_ID" in os.environ:
            nodes = self.rt.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", self.rt.world_size))
            launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', self.rt.world_size)}"]
            launcher += [f"--nnodes={nodes} <rendezvous flags>"] if nodes > 1 else []
        command = " ".join([*launcher, os.path.basename(sys.argv[0]), *argv, "--resume", path])
        name = signal.Signals(stop.signal).name
        self.logger.print(f"{name}: stopped at epoch {epoch + 1} step {step}; state saved to {path}; continue with: {command}")
        self.logger.close()
        sys.exit(stop.exit_code)

    def finish(self):
        """Print and save (results.json) the last epoch's and the best-validation numbers."""
        self.logger.close()
        if not getattr(self, "final", None):
            return None
        results = {"run_dir": self.run_dir, "dataset": self.info.name, "synthetic": self.info.synthetic,
                   "epochs": self.final[0]["epoch"], "networks": []}
        for i, row in enumerate(self.final):
            entry = {"net": row["net"], "model": row["model"], "final_test_acc": row["test_acc"],
                     "final_val_acc": row.get("val_acc")}
            if i < len(self.nets) and self.val_loader is not None:
                entry.update(best_val_acc=self.best["val_acc"][i], best_epoch=self.best["epoch"][i],
                             test_acc_at_best_val=self.best["test_acc"][i])
            results["networks"].append(entry)
        if self.rt.is_main:
            save_json(results, os.path.join(self.run_dir, "results.json"))
            self.logger.print("final test accuracy (last epoch): " + ", ".join(
                f"{e['net']} {e['final_test_acc']:.2f}%" for e in results["networks"]))
        return results


class CapturedStep:
    """Runs a training step eagerly or, with CUDA graphs, captures it once and replays it.

    `core(*tensors)` is one whole optimisation step of the group (every forward, the losses and
    the competitive selection, one backward, every optimizer step, the statistics) written without
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


def make_scaler(rt, run):
    """Gradient scaler for fp16 autocast (a pass-through otherwise), restored on resume."""
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    if run.resume_extra("scaler"):
        scaler.load_state_dict(run.resume_extra("scaler"))
    return scaler


def train_loop(args, rt, run, train_loader, schedule, keys, train_step, state=dict):
    """The epoch skeleton every script shares; the script's `train_step` is its paradigm.

    train_step(step, images, labels) runs one optimisation step of the whole group and returns
    its (n, len(keys)) tensor of statistics, which stays on the device until the epoch ends.
    state() returns the script's extra resumable state (scaler, perturbation generators).
    A SIGINT/SIGTERM is honoured between steps: the state is saved and the process exits.
    """
    show = progress_enabled(args, rt)
    with StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            stats = StepStats(keys, len(run.nets), rt.device)
            skip = run.skip_steps(epoch)
            if skip:
                stats.load_state_dict(run.resume_extra("stats"), rt)
            start = now()
            for step, (images, labels) in enumerate(progress(train_loader, show, desc=f"epoch {epoch + 1}")):
                lrs = schedule.step(epoch * len(train_loader) + step)
                if step < skip:  # replaying the loader keeps its random stream exact on resume
                    continue
                stats.add(train_step(step, images, labels))
                if stop.requested(step):
                    run.interrupt(stop, epoch, step + 1, {"stats": stats.state_dict(rt), **state()})
            run.end_epoch(epoch, stats.means(rt), lrs, now() - start, state())
            if epoch + 1 < args.epochs and stop.requested():  # after the last epoch, finishing is quicker
                run.interrupt(stop, epoch + 1, 0, state())
            if run.should_stop_after(epoch):
                break
    return run.finish()
