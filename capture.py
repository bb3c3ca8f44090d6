"""--cuda-graphs: a whole training step captured once in a CUDA graph and replayed, the sums of its
statistics added inside the graph (no per-step kernels outside it)."""
import warnings

import torch


class StepSums:
    """The statistics' sums in device buffers of fixed address, to which a step adds its statistics: every
    epoch's EpochStats sums with one, and with --cuda-graphs the captured step adds to the run's own inside
    its CUDA graph (no per-step kernels outside it)."""

    def __init__(self, device):
        self.sums, self.first_nonfinite = {}, None
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # the index of the next step in its epoch

    def add(self, stats):
        """Add one step's statistics in place (inside the captured graph: no new buffer there)."""
        values = [value.detach().to(torch.float64).reshape(-1) for value in stats.values()]
        allocating = self.first_nonfinite is None or any(name not in self.sums for name in stats)
        if allocating and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("StepSums allocate their buffers in an eager call: warm the captured step up first")
        for name, value in zip(stats, values):
            if name in self.sums:
                self.sums[name].add_(value)
            else:  # the first step: its values are the sums
                self.sums[name] = value.clone()
        bad = ~torch.isfinite(torch.stack(values)).all(0)
        if self.first_nonfinite is None:
            self.first_nonfinite = torch.full_like(bad, -1, dtype=torch.int64)
        self.first_nonfinite.copy_(torch.where(bad & (self.first_nonfinite < 0), self.step, self.first_nonfinite))
        self.step.add_(1)

    def restart(self, first_step):
        """Empty the sums in place for an epoch whose first step here is `first_step`."""
        for value in self.sums.values():
            value.zero_()
        if self.first_nonfinite is not None:
            self.first_nonfinite.fill_(-1)
        self.step.fill_(first_step)

    def load(self, sums):
        """Copy an interrupted epoch's sums {name: float64 tensor} into the buffers."""
        for name, value in sums.items():
            if name in self.sums:
                self.sums[name].copy_(value)
            else:
                self.sums[name] = value.to(self.step.device, torch.float64).clone()


def summed(step, sums):
    """`step`, followed by the addition of its statistics to the StepSums `sums`; returns `sums`."""
    def step_and_sum(*arguments):
        sums.add(step(*arguments))
        return sums
    return step_and_sum


def capture_step(run, step, **kwargs):
    """`step` captured in one CUDA graph together with the addition of its statistics to the run's
    StepSums (--cuda-graphs), which every epoch's EpochStats reads (epoch_stats); kwargs go to
    CapturedStep."""
    run.step_sums = StepSums(run.rt.device)
    return CapturedStep(summed(step, run.step_sums), **kwargs)


class CapturedStep:
    """Runs a training step captured once in a CUDA graph and then replayed (--cuda-graphs).

    `step(*arguments)` is one whole optimisation step of the group (every forward, the losses and
    a paradigm's selection of teachers, one backward, every optimizer step, the statistics) written
    without host synchronisation: fixed shapes, no `.item()`, no Python branch on tensor values,
    learning rates held in device tensors (fused optimizers read them on the device). Its arguments
    are tensors or lists of tensors. The first `warmup` calls run eagerly on a side stream (cuDNN
    autotuning, optimizer state allocation); the next call records the graph, and every later call
    copies its tensors into the graph's static inputs and replays it: one launch instead of
    thousands, no Python in the loop.

    capture=False keeps everything but the graph: the warm-up calls, then every call copies its
    tensors into the static inputs and runs the step eagerly on them. It is how the tests run this
    path on a CPU, where a change that breaks it must fail too.
    """

    def __init__(self, step, *, warmup=3, capture=True):
        self.step, self.warmup, self.capture = step, warmup, capture
        self.calls, self.graph, self.static_inputs, self.static_arguments, self.static_output = 0, None, None, None, None

    def __call__(self, *arguments):
        if self.static_inputs is None and self.calls < self.warmup:
            self.calls += 1
            return self._eager(arguments)
        tensors = _flat_tensors(arguments)
        if self.static_inputs is None:
            self.static_inputs = [t.clone() for t in tensors]
            static = iter(self.static_inputs)
            self.static_arguments = [[next(static) for _ in a] if isinstance(a, (list, tuple)) else next(static)
                                     for a in arguments]
            if self.capture:
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA calls of other threads (the torch loader's pin-memory thread) may
                # go on during the capture; the default global mode would abort it.
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.static_output = self.step(*self.static_arguments)
        else:
            for static, tensor in zip(self.static_inputs, tensors, strict=True):
                static.copy_(tensor, non_blocking=True)
        if not self.capture:
            return self.step(*self.static_arguments)
        self.graph.replay()
        return self.static_output

    def _eager(self, arguments):
        """One warm-up call, on a side stream when it precedes a capture (as torch.cuda.graphs' notes ask)."""
        if not self.capture:
            return self.step(*arguments)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # capturable optimizers (Adam, AdamW) warn when stepped outside a capture: expected here
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            output = self.step(*arguments)
        torch.cuda.current_stream().wait_stream(side)
        return output


def _flat_tensors(arguments):
    """The tensors of a step's arguments (each a tensor or a list of tensors), in order."""
    return [t for a in arguments for t in (a if isinstance(a, (list, tuple)) else [a])]
