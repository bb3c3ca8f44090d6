"""Checkpoints and the run directory, in one place (in the spirit of timm's CheckpointSaver): the
directory and its lock, last.pt after every epoch and on a stop request, best.pt with each network
at its best validation accuracy, and a resume that continues exactly what the checkpoint holds.

A checkpoint holds only tensors, numbers, strings and vars(args), loads with
torch.load(weights_only=True), is written atomically and names its models, so that demo.py can
rebuild the group from it alone.
"""
import atexit
import datetime
import glob
import hashlib
import json
import os
import random
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from errors import RunComplete, RunFailure, UsageError
from models import unwrap

CHECKPOINT_FORMAT = 2  # 2: the scripts' own resumable objects under "state" (format 1 named it "extra")

# What every checkpoint holds (demo.py rebuilds the group from it; --resume continues it).
CHECKPOINT_KEYS = ("models", "num_classes", "img_size", "in_chans", "dataset", "classes", "mean", "std", "args",
                   "epoch", "step", "nets", "optimizers", "rng", "state")

# What a run writes into its directory (--overwrite deletes these, and nothing else).
RUN_FILES = ("args.json", "metrics.csv", "last.pt", "best.pt", "results.json", "events.out.tfevents.*",
             "predictions.png", "curves.png", "deployed.pt", os.path.join("steps", "events.out.tfevents.*"), "wandb_id")
LOCK_FILE = ".lock"

# The group settings that belong to this run, not to the run that wrote the checkpoint: the kernels
# (foreach on the CPU, fused on CUDA, capturable with --cuda-graphs) and the rate holder (a device tensor that a
# captured step reads must stay the same tensor; the schedule rewrites its value every step).
RUN_OWNED_GROUP_KEYS = ("lr", "fused", "capturable", "foreach")


class Checkpoints:
    """last.pt and best.pt of one run directory, and the best-so-far record that selects best.pt.

    `state` maps names to the script's own objects with state_dict()/load_state_dict() (the gradient
    scaler, the perturbation's generators, ...): they go into every checkpoint and come back on resume.
    `record`: the run's arguments as configs.record makes them ({"args": its flags, "given": the flags its
    command line gave, "resolved": what it computed from them}), written into every checkpoint.
    """

    def __init__(self, run_dir, *, script, args, record, info, names, nets, optimizers, rt, state):
        self.run_dir, self.script, self.args, self.record, self.info, self.rt = run_dir, script, args, record, info, rt
        self.names, self.nets, self.optimizers, self.state = list(names), nets, optimizers, state
        n = len(nets)
        self.best = {"val_acc": [-1.0] * n, "epoch": [0] * n, "test_acc": [None] * n}
        self.best_states = [None] * n   # each network's weights at its best validation accuracy
        self.resumed_best = None        # the best.pt found beside the checkpoint resumed from
        self.last_rows = []             # the latest epoch's metrics rows (engine.log_epoch), for results.json
        self.last_ema_rows = []         # ... and those of the --model-ema averages

    def checkpoint(self, epoch, step, stats=None):
        """Everything needed to rebuild the group (demo.py) and to continue training exactly.

        `epoch` is the number of completed epochs and `step` the iterations already done in the next
        one (0 at an epoch boundary; > 0 only when training was interrupted mid-epoch, when `stats`, the
        epoch's statistics so far, come along). A collective under torchrun (the statistics' sums).
        """
        info = self.info
        state = {key: to_cpu(obj.state_dict()) for key, obj in self.state.items()}
        state["best"], state["rows"], state["ema_rows"] = self.best, self.last_rows, self.last_ema_rows
        if stats is not None:
            state["stats"] = stats.state_dict()
        return {"format": CHECKPOINT_FORMAT, "script": self.script, "models": self.names,
                "num_classes": info.num_classes, "img_size": info.img_size, "in_chans": info.in_chans,
                "dataset": info.name, "classes": list(info.classes), "mean": list(info.mean), "std": list(info.std),
                **self.record, "epoch": epoch, "step": step,
                "nets": [{k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()} for net in self.nets],
                "optimizers": [to_cpu(opt.state_dict()) if opt is not None else {} for opt in self.optimizers],  # {}: --freeze
                "rng": rng_state(self.rt), "state": state}

    def save(self, epoch, evals):
        """After epoch `epoch`: last.pt always; best.pt when a network's validation accuracy improved
        (each network's weights of its best epoch; the test set never selects)."""
        val, test = evals["val"], evals["test"]
        improved = False
        for i in range(len(self.nets) if val is not None else 0):
            if val[i]["acc"] > self.best["val_acc"][i]:
                self.best["val_acc"][i], self.best["epoch"][i], self.best["test_acc"][i] = val[i]["acc"], epoch + 1, test[i]["acc"]
                self.best_states[i] = {k: v.detach().cpu().clone() for k, v in unwrap(self.nets[i]).state_dict().items()}
                improved = True
        if not self.rt.is_main:
            return
        last = self.checkpoint(epoch + 1, 0)
        if improved:
            atomic_save({**last, "nets": self.best_states, "optimizers": []}, self.path("best.pt"))
        atomic_save(last, self.path("last.pt"))

    def save_interrupted(self, epoch, step, stats):
        """last.pt after `step` iterations of epoch `epoch` (a stop request); returns its path."""
        # Under torchrun every process reached this step (stopping.StopRequest agreed on it): rank 0's
        # weights are everyone's, and its buffers are the ones DDP broadcasts at the next step.
        checkpoint = self.checkpoint(epoch, step, stats)  # a collective (the statistics' sums)
        if self.rt.is_main:
            atomic_save(checkpoint, self.path("last.pt"))
        if self.rt.distributed:
            dist.barrier()  # nobody exits (which makes torchrun stop the others) before the save is done
        return self.path("last.pt")

    def restore(self, path):
        """Continue from checkpoint `path`: the group, its optimizers, the random generators, the
        scripts' `state` objects and the best-so-far record; returns (epoch, step, state) of the checkpoint."""
        ckpt = load_checkpoint(path)
        args = self.args
        if ckpt["script"] != self.script:
            raise UsageError(f"--resume '{path}' was written by the {ckpt['script']} script; this is the {self.script} script")
        if ckpt["epoch"] >= args.epochs and args.resume == "auto":
            raise RunComplete(f"the run in '{os.path.dirname(path)}' is complete ({ckpt['epoch']} of {args.epochs} epochs): "
                              f"nothing to do (raise --epochs to train on)", ckpt)
        if ckpt["epoch"] >= args.epochs:
            raise UsageError(f"--resume '{path}' has already trained {ckpt['epoch']} of {args.epochs} epochs; "
                             f"to train on, raise --epochs (the learning-rate schedule then spans the new total)")
        check_resumable(ckpt, path, args, self.info, self.names, self.rt)
        for net, weights in zip(self.nets, ckpt["nets"]):
            unwrap(net).load_state_dict(weights)
        for optimizer, saved in zip(self.optimizers, ckpt["optimizers"]):
            if optimizer is not None:
                load_optimizer_state(optimizer, saved)
        set_rng_state(ckpt["rng"], self.rt)
        for key, obj in self.state.items():
            if ckpt["state"].get(key):  # a disabled GradScaler saves {}: nothing to restore
                obj.load_state_dict(ckpt["state"][key])
        self._restore_best(path, ckpt["state"].get("best", self.best))
        return ckpt["epoch"], ckpt["step"], ckpt["state"]

    def _restore_best(self, path, best):
        """The best weights so far sit next to the checkpoint (--out-dir may name a new directory)."""
        best_path = os.path.join(os.path.dirname(os.path.abspath(path)), "best.pt")
        if not os.path.exists(best_path):
            if max(best["val_acc"]) >= 0:
                print(f"note: no best.pt next to '{path}': best-checkpoint selection restarts from this run", flush=True)
            return
        try:
            best_ckpt = load_checkpoint(best_path)
        except UsageError as error:
            raise UsageError(f"{error}; it holds the best weights so far: remove or rename it to resume "
                             f"(best-checkpoint selection then restarts from this run)") from None
        self.best, self.best_states, self.resumed_best = best, best_ckpt["nets"], best_ckpt

    def copy_resumed_best(self):
        """Resumed into a new --out-dir: copy the best.pt found beside the checkpoint, so the new run
        directory is complete."""
        if self.resumed_best is not None and self.rt.is_main and not os.path.exists(self.path("best.pt")):
            atomic_save(self.resumed_best, self.path("best.pt"))

    def path(self, name):
        """A file of this run directory."""
        return os.path.join(self.run_dir, name)


def to_cpu(value):
    """`value` (a state_dict: nested dicts, lists and tensors) with every tensor copied to the CPU, so that a
    checkpoint written on a GPU loads on a machine without one (torch.load with no map_location); loading
    puts the tensors back where the run computes (the optimizers and modules copy them to their device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def check_resumable(ckpt, path, args, info, names, rt):
    """UsageError in one line unless checkpoint `ckpt` holds this run's group, task and processes."""
    if list(ckpt["models"]) != list(names):
        raise UsageError(f"--resume '{path}' holds models {ckpt['models']}, this run builds {list(names)}")
    if ckpt["num_classes"] != info.num_classes or ckpt["img_size"] != info.img_size or ckpt["in_chans"] != info.in_chans:
        raise UsageError(f"--resume '{path}' was trained for {ckpt['num_classes']} classes at "
                         f"{ckpt['in_chans']}x{ckpt['img_size']}px; this run has {info.num_classes} classes at "
                         f"{info.in_chans}x{info.img_size}px")
    processes = ckpt.get("resolved", ckpt["args"]).get("world_size", 1)
    if processes != rt.world_size:
        raise UsageError(f"--resume '{path}' was written by {processes} processes; "
                         f"resume it with the same number (this run has {rt.world_size})")


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


def rng_state(rt):
    """All random generator states, as tensors and plain values (weights_only-loadable)."""
    python = random.getstate()
    np_state = np.random.get_state()
    return {"python": list(python[1]), "python_pos": python[2], "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None}


def set_rng_state(state, rt):
    """Restore what rng_state() saved."""
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], rt.device)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints, and where a resume starts
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path, mmap=False):
    """Load one of our checkpoints (weights only; with mmap the tensors stay on disk until read, for
    a look at its arguments); UsageError when missing, corrupt or foreign."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' " + ("is a directory, not a checkpoint file" if os.path.isdir(path) else "does not exist"))
    if not zipfile.is_zipfile(path):
        raise UsageError(f"'{path}' is not a PyTorch checkpoint file (expected a .pt written by this repository's scripts)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UsageError(f"'{path}' is not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == 1 and "nets" in ckpt:
        raise UsageError(f"'{path}' was written by an earlier version of these scripts (checkpoint format 1); "
                         f"its networks still load with --init, but it cannot be resumed or shown by this version")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "nets" not in ckpt:
        raise UsageError(f"'{path}' is not a checkpoint written by this repository's scripts")
    missing = [key for key in (*CHECKPOINT_KEYS, "script") if key not in ckpt]
    if missing:
        raise UsageError(f"'{path}' is an incomplete checkpoint (no {', '.join(missing)}): rewrite it with this repository's scripts")
    return ckpt


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
# The run directory and its lock
# ----------------------------------------------------------------------------------------------
def prepare_run_dir(run_dir, *, fresh, args):
    """Create the run directory and lock it for this process; a fresh run refuses a directory that
    holds an earlier run unless --overwrite (which deletes that run's files). Temporary files left by
    killed processes are removed. Returns the lock (see lock_run_dir)."""
    check_run_dir(run_dir)
    lock = None
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = lock_run_dir(run_dir)
        for tmp in glob.glob(os.path.join(glob.escape(run_dir), "*.tmp*")):
            pid = tmp.rsplit(".tmp", 1)[1]
            if pid.isdigit() and not process_alive(int(pid)):
                os.remove(tmp)
        earlier = [p for pattern in RUN_FILES for p in glob.glob(os.path.join(glob.escape(run_dir), pattern))]
        # What a run that died before its first epoch leaves: its arguments, an empty event file and at
        # most a metrics.csv without rows; anything else holds results.
        started = [p for p in earlier if not os.path.basename(p).startswith(("args.json", "events.out.tfevents", "wandb_id"))
                   and not (os.path.basename(p) == "metrics.csv" and not has_rows(p))]
        if fresh and earlier and (getattr(args, "overwrite", False) or (args.resume == "auto" and not started)):
            for path in earlier:
                os.remove(path)
        elif fresh and earlier and args.resume == "auto":
            unlock_run_dir(*lock)
            raise UsageError(f"--out-dir '{run_dir}' holds an earlier run's results ({', '.join(sorted(map(os.path.basename, started))[:4])}) "
                             f"but no last.pt to continue from; nothing was deleted: --overwrite starts afresh there "
                             f"(deleting them), or choose another --out-dir")
        elif fresh and earlier:
            unlock_run_dir(*lock)
            raise UsageError(f"--out-dir '{run_dir}' holds an earlier run ({', '.join(sorted(map(os.path.basename, earlier))[:4])}); "
                             f"continue it with --resume auto, start afresh there with --overwrite, or choose another --out-dir")
        return lock
    except OSError as error:
        raise RunFailure(f"cannot write to run directory '{run_dir}': {error.strerror or error}") from None


def check_resume_target(run_dir, resume):
    """UsageError in one line when --resume A/last.pt --out-dir B names a B that holds another run's files:
    a run directory belongs to one run, so B must be empty (or new) or A's own directory."""
    if os.path.realpath(run_dir) == os.path.realpath(os.path.dirname(os.path.abspath(resume))):
        return
    found = sorted({os.path.basename(p) for pattern in RUN_FILES for p in glob.glob(os.path.join(glob.escape(run_dir), pattern))})
    if found:
        raise UsageError(f"--out-dir '{run_dir}' holds another run ({', '.join(found[:4])}), not the one of --resume "
                         f"'{resume}': a resume continues its run in its own directory or in an empty one; choose "
                         f"another --out-dir")


def check_run_dir(run_dir):
    """UsageError in one line for a run directory that cannot be one: a file, a dangling symlink, a
    name longer than the file system allows."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        what = "a dangling symbolic link" if os.path.islink(run_dir) else "a file"
        raise UsageError(f"--out-dir '{run_dir}' is {what}, not a directory; choose another --out-dir")
    parent = os.path.dirname(os.path.abspath(run_dir))
    limit = os.pathconf(parent, "PC_NAME_MAX") if os.path.isdir(parent) else 255
    if len(os.path.basename(os.path.abspath(run_dir)).encode()) > limit:
        raise UsageError(f"--out-dir '{run_dir}': its name is longer than the file system allows ({limit} bytes); choose a shorter one")


def default_run_dir(script, dataset, names):
    """runs/<script>-<dataset>-<models>-<time>, the models' part shortened (with a hash of the whole)
    when the name would be long."""
    models = "-".join(names).replace(":", "_")
    if len(models) > 80:
        models = f"{models[:60]}-{len(names)}nets-{hashlib.sha1(models.encode()).hexdigest()[:8]}"
    return os.path.join("runs", f"{script}-{dataset}-{models}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def has_rows(csv_path):
    """True when a CSV file has a line after its header."""
    try:
        with open(csv_path, "rb") as f:
            return len([line for line in f.read().splitlines()[1:] if line.strip()]) > 0
    except OSError:
        return True


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
    """Take <run_dir>/.lock for this process (released by unlock_run_dir, or at exit): two runs never
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


# ----------------------------------------------------------------------------------------------
# Writing files atomically
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
