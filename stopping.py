"""Stopping a run between two steps on SIGINT, SIGTERM or SIGHUP: the state is saved as last.pt, the
command that continues the run is printed, and the exit code says which signal it was."""
import os
import signal
import sys

import torch
import torch.distributed as dist

import flags
from engine import print_main


# Under torchrun a signal can reach the processes at different steps, or only one of them; they
# compare flags every STOP_CHECK_STEPS steps (one small all-reduce and host synchronisation) and
# at every epoch end, and stop together, so a checkpoint only holds a step that every process ran.
STOP_CHECK_STEPS = 10
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a stop never lands mid-update."""

    def __init__(self, rt):
        self.rt, self.signal = rt, None
        self._previous = {}
        # torchrun forwards the signal it receives and SIGKILLs workers 30 s later; a worker may be
        # signalled twice (e.g. by Slurm and by torchrun), so there a repeat is not "stop now".
        self._escalate = "TORCHELASTIC_RUN_ID" not in os.environ

    def __enter__(self):
        # SIGHUP too: a closed terminal or ssh session stops the run the way SIGTERM does (exit 129)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        flags.STOP["phase"] = "training"
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            if self._escalate:  # a second Ctrl-C (or SIGTERM) before the first was honoured: stop now
                raise flags.SignalStop(signum)
            return
        self.signal = signum

    def __exit__(self, exc_type, *exc):
        # Leaving on an exception after a stop request means the process is exiting: a repeated
        # Ctrl-C must not raise KeyboardInterrupt inside the interpreter's shutdown (atexit) hooks.
        exiting = self.signal is not None and exc_type is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)
        if exc_type is None:  # the loop ran to its end; an exception leaves the phase for launch's message
            flags.STOP["phase"] = "finishing"
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


def save_and_stop(run, stop, epoch, step, stats=None):
    """Save the state after `step` iterations of `epoch` as last.pt and say how to resume; returns
    the exit code, 128 + the signal's number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP)."""
    for sig in STOP_SIGNALS:  # a repeated Ctrl-C must not abort the save
        signal.signal(sig, signal.SIG_IGN)
    path = run.checkpoints.save_interrupted(epoch, step, stats)
    print_main(run.rt, f"{signal.Signals(stop.signal).name}: stopped at epoch {epoch + 1} step {step}; state saved "
                       f"to {path}; continue with: {resume_command(run.rt, path)}")
    run.metrics.close()
    return 128 + stop.signal


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
