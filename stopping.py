"""How a run ends: `launch` runs a script's main and turns what a user can cause into one line on
stderr and an exit code; a signal (SIGINT, SIGTERM, SIGHUP) between two training steps saves the state
as last.pt, prints the command that continues the run and exits with the signal's code.

Exit codes: 0 done (or nothing left to do), 1 the run cannot go on (disk full or read-only, out of
memory), 2 bad input (flags, files, data), 3 training diverged, 130/143/129 stopped by SIGINT/SIGTERM/
SIGHUP with the state saved.
"""
import gc
import os
import signal
import sys

import torch
import torch.distributed as dist

from datasets import DatasetError
from datasets.loaders import close_workers
from errors import RunComplete, RunFailure, UsageError, fail


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
        STOP["phase"] = "training"
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            if self._escalate:  # a second Ctrl-C (or SIGTERM) before the first was honoured: stop now
                raise SignalStop(signum)
            return
        self.signal = signum

    def __exit__(self, exc_type, *exc):
        # Leaving on an exception after a stop request means the process is exiting: a repeated
        # Ctrl-C must not raise KeyboardInterrupt inside the interpreter's shutdown (atexit) hooks.
        exiting = self.signal is not None and exc_type is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)
        if exc_type is None:  # the loop ran to its end; an exception leaves the phase for launch's message
            STOP["phase"] = "finishing"
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
    if run.rt.is_main:
        print(f"{signal.Signals(stop.signal).name}: stopped at epoch {epoch + 1} step {step}; state saved to {path}; "
              f"continue with: {resume_command(run.rt, path)}", flush=True)
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


# ----------------------------------------------------------------------------------------------
# Launching a script: its errors and signals as one line and an exit code
# ----------------------------------------------------------------------------------------------
def launch(main, parser, argv=None):
    """Parse argv and run main(args); what a user can cause ends in one line on stderr and a
    non-zero exit code (2 for bad input), never in a traceback."""
    try:
        args = parser.parse_args(argv)  # a flags.ArgumentParser: with --config and --resume over the recorded run
    except UsageError as error:
        fail(str(error))

    def checked_main(args):
        rank = f"rank {os.environ['RANK']}: " if os.environ.get("WORLD_SIZE", "1") not in ("1", "") and "RANK" in os.environ else ""
        try:
            return main(args)
        except (UsageError, DatasetError) as error:
            fail(rank + str(error))
        except RunFailure as error:
            fail(rank + str(error), error.exit_code)
        except RunComplete as error:
            print(str(error), flush=True)
            return None
        except KeyboardInterrupt as error:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a further one must not interrupt the exit
                signal.signal(sig, signal.SIG_IGN)
            signum = getattr(error, "signum", signal.SIGINT)
            fail(rank + interrupted_message(signum), 128 + signum)
        except (MemoryError, torch.OutOfMemoryError) as error:
            fail(rank + out_of_memory_message(error), 1)
        except RuntimeError as error:
            message = runtime_error_message(error, args)
            if message is None:  # a bug: its traceback
                raise
            fail(rank + message, 1)

    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun, record() saves a crashing rank's traceback for the launcher's
        # end-of-job summary, whose "Root Cause" names the rank that failed first.
        from torch.distributed.elastic.multiprocessing.errors import record
        checked_main = record(checked_main)
    stdout, sys.stdout = sys.stdout, SurvivingStdout(sys.stdout)
    STOP["phase"] = "setup"
    handlers = stop_outside_the_loop()
    try:
        result = checked_main(args)
    finally:
        try:
            close_workers()  # whether the run finished or failed
        finally:
            sys.stdout = stdout
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if argv is None:  # the process's own command line: it ends now, its run complete
        for sig in STOP_SIGNALS:
            signal.signal(sig, after_the_run)
    close_process_group()
    return result


def close_process_group():
    """Destroy the default process group, if any, after freeing what still holds it. A run's DDP wrappers
    sit in reference cycles: uncollected, their reducers and the group would be freed only during
    interpreter shutdown, where a gloo rank whose run had ended has aborted ("terminate called without
    an active exception", exit -6) and so failed the torchrun job."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def after_the_run(signum, frame):
    """A signal while a process whose run is complete exits: one line, and exit code 0 (nothing is lost)."""
    print(f"{signal.Signals(signum).name} after the run had finished: its files are complete", flush=True)
    sys.exit(0)


def runtime_error_message(error, args):
    """The one line for a RuntimeError a user can cause (a distributed timeout, memory running out), or None."""
    # gloo: "Timed out waiting ...", "Application timeout caused pair closure"; NCCL: "... timed out"
    if any(word in str(error).lower() for word in ("timed out", "timeout")) and dist.is_initialized():
        return (f"waited longer than --dist-timeout ({args.dist_timeout:g} s) for the other processes: one "
                f"of them is stopped, hung or gone; continue with --resume auto once all can run")
    if "can't allocate memory" in str(error) or "out of memory" in str(error):
        return out_of_memory_message(error)
    return None


class SignalStop(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside the training loop (whose stopping.StopRequest saves the state first),
    or a second signal inside it before the first was honoured; carries the signal's number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_outside_the_loop():
    """SIGTERM and SIGHUP raise SignalStop until the training loop takes the signals over, so that a
    run stopped while it starts or finishes exits in one line, releasing its run directory's lock;
    returns the previous handlers."""
    def handle(signum, frame):
        raise SignalStop(signum)
    try:
        return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread: signals are the main thread's
        return {}


def interrupted_message(signum=signal.SIGINT):
    """What a KeyboardInterrupt (or SignalStop) that reached launch means, by the run's phase (STOP)."""
    name = signal.Signals(signum).name
    if STOP["phase"] == "setup":  # before the training loop took over the signals
        return ("interrupted" if signum == signal.SIGINT else f"stopped by {name}") + " before training began: nothing was saved"
    if STOP["phase"] == "finishing":
        return f"{name} while finishing: last.pt holds the trained run; --resume auto finishes it"
    # a second Ctrl-C while a step ran: the first one had not been honoured yet
    return "interrupted twice: stopped at once, without saving; the run directory keeps the last checkpoint written, if any"


# Where the run is, for the message of a KeyboardInterrupt (stopping.StopRequest sets it): in "setup"
# it stops a run that saved nothing; in "training" the loop's handler turned the first signal into a
# stop request, so it is a second Ctrl-C; in "finishing" the last checkpoint is written.
STOP = {"phase": "setup"}


class SurvivingStdout:
    """stdout that stops printing, not training, when its reader goes away (`train.py ... | head -3`):
    a write to a closed pipe sends the rest of the run's output to /dev/null."""

    def __init__(self, stream):
        self.stream, self.reader_gone = stream, False

    def write(self, text):
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._reader_went_away()
        return len(text)

    def flush(self):
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_went_away()

    def _reader_went_away(self):
        self.reader_gone = True
        try:  # the interpreter flushes stdout at exit too: point the descriptor at /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, AttributeError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def out_of_memory_message(error):
    """One line for an allocation that failed (host or device memory)."""
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return f"out of memory ({detail}); lower --batch-size, --eval-batch-size or --img-size"
