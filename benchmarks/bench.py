"""Training speed of a group of networks: images per second of whole group steps.

Variants, all on synthetic data of a chosen shape (the numbers describe speed, never accuracy):
  reference  the authors' per-step behaviour: torchvision DataLoader with PIL transforms, fp32,
             losses read back with .item() every step, teachers chosen in Python, each network's
             backward and optimizer step in sequence, perturbation noise built in float64 NumPy.
             Its optimizer is the one default/fast use (SGD with Nesterov momentum, PyTorch's own
             default kernels), so the ratio compares training loops, not optimizers.
  default    this repository's scripts as they run by default on the device (batched loader on
             the device, autocast as --amp auto picks, channels_last, one backward, device-side
             statistics, no per-step synchronisation).
  fast       default plus torch.compile of the networks and, on CUDA, the whole step captured
             in one CUDA graph (--cuda-graphs).

    python benchmarks/bench.py --models resnet32 resnet32 --batch-size 128 --device cuda
    python benchmarks/bench.py --suite --device cuda --json bench.json
    python benchmarks/bench.py --device cpu --variants reference default --amp none bf16
"""
import argparse
import functools
import os
import platform
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/bench.py` from anywhere
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import capture  # noqa: E402
import checkpoints  # noqa: E402
import engine  # noqa: E402
import flags  # noqa: E402
import models  # noqa: E402
import stopping  # noqa: E402
import train_competitive_distillation as competitive  # noqa: E402
import train_mutual_learning as mutual  # noqa: E402
import utils  # noqa: E402
from datasets import build_data, make_loaders  # noqa: E402
from losses import kd_loss  # noqa: E402
from perturb import Perturber  # noqa: E402

PARADIGMS = {"competitive": competitive, "mutual": mutual}
PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def get_args_parser():
    """Benchmark flags."""
    parser = argparse.ArgumentParser(description="Images/s of group training steps.",
                                     formatter_class=flags.HelpFormatter)
    add = parser.add_argument
    add("--paradigm", default="competitive", choices=sorted(PARADIGMS), help="which group step to time")
    add("--models", nargs="+", default=["resnet32", "resnet32"], help="the group")
    add("--batch-size", type=int, default=128, help="images per step (each network sees all of them)")
    add("--img-size", type=int, default=32, help="input size (224 = the authors' CIFAR-100 setting)")
    add("--num-classes", type=int, default=100, help="classes of the synthetic data (CIFAR-100 shaped)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--variants", nargs="+", default=["reference", "default", "fast"], choices=["reference", "default", "fast"])
    add("--amp", nargs="+", default=["auto"], choices=["auto", "none", "bf16"],
        help="autocast precision(s) of the default and fast variants, each timed in turn (auto: as the scripts pick; "
             "the reference is always fp32)")
    add("--steps", type=int, default=50, help="timed steps per repeat")
    add("--warmup", type=int, default=10, help="untimed steps first (compilation, cuDNN autotuning)")
    add("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    add("--workers", type=int, default=8, help="DataLoader workers of the reference loop (the authors used 8)")
    add("--perturb-every", type=int, default=10, help="perturbation period (authors: 10)")
    add("--suite", action="store_true", help="time the standard set: the pair, a 4-network group, the pair at 224 px")
    add("--json", default=None, help="write the results here as JSON")
    return parser


def synthetic_data(args):
    """CIFAR-shaped uint8 images and labels (from the `fake` dataset), resized to --img-size."""
    return build_data("fake", img_size=args.img_size, val_size=0, num_classes=args.num_classes)


def build_group(args, device, channels_last):
    """The group's networks on the device."""
    nets = []
    for name in args.models:
        net = models.create_model(name, num_classes=args.num_classes, img_size=args.img_size, in_chans=3)
        nets.append(net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format))
    return nets


def endless(loader):
    """Batches forever, re-shuffling each pass."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def reference_steps(args, device):
    """A step function reproducing the authors' per-step behaviour (see the module docstring)."""
    data = synthetic_data(args)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    batches = endless(loader)
    nets = build_group(args, device, channels_last=False)
    optimizers = [torch.optim.SGD(net.parameters(), lr=utils.default_lr("sgd", args.batch_size), momentum=0.9,
                                  nesterov=True, weight_decay=5e-4) for net in nets]
    rng = np.random.default_rng(0)
    history = []
    state = {"step": 0}

    def step():
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        inputs = [images] * len(nets)
        if args.perturb_every and state["step"] % args.perturb_every == 0:
            r = int(rng.integers(len(nets)))  # float64 noise made on the CPU, as the authors did
            noise = torch.from_numpy(rng.normal(0, 0.25, images.shape)).to(device).float()
            inputs = [(images + noise).clamp(0, 1) if i == r else images for i in range(len(nets))]
        state["step"] += 1
        logits = [net(x) for net, x in zip(nets, inputs)]
        losses = [F.cross_entropy(z, labels) for z in logits]
        values = [loss.item() for loss in losses]                      # host synchronisation
        for i, (net, optimizer) in enumerate(zip(nets, optimizers)):
            teachers = [j for j in range(len(nets)) if values[j] < values[i]]
            loss = losses[i]
            if teachers and args.paradigm == "competitive":
                loss = loss + sum(kd_loss(logits[i], logits[j]) for j in teachers) / len(teachers)
            elif args.paradigm == "mutual":
                loss = loss + sum(kd_loss(logits[i], logits[j]) for j in range(len(nets)) if j != i) / (len(nets) - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append([(z.argmax(1) == labels).float().mean().item() for z in logits])  # per-step logging

    return step


def repository_steps(args, device, compile_nets, amp):
    """A step function running the scripts' own code path (loader, perturbation, group step) at
    autocast precision `amp` (as the scripts' --amp); its `precision` attribute names the one used."""
    module = PARADIGMS[args.paradigm]
    argv = ["--models", *args.models, "--batch-size", str(args.batch_size), "--device", str(device),
             "--perturb-every", str(args.perturb_every), "--amp", amp]
    if compile_nets and device.type == "cuda":
        argv.append("--cuda-graphs")
    script_args = module.get_args_parser().parse_args(argv)
    rt = utils.setup_runtime(script_args)
    data = synthetic_data(args)
    train_loader, _, _ = make_loaders(data, batch_size=args.batch_size, loader="gpu", device=device, seed=0)
    batches = endless(train_loader)
    nets = build_group(args, device, channels_last=True)
    if compile_nets:
        # Static shapes: each configuration's figure is a graph specialised to its own input size,
        # never a dynamic-shape recompilation triggered by an earlier configuration's size.
        nets = [torch.compile(net, dynamic=False) for net in nets]
    optimizers, _ = utils.build_optimizers(script_args, nets, rt)
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)
    perturber = Perturber(every=args.perturb_every, ops=script_args.perturbations, num_nets=len(nets), seed=0,
                          mean=data.info.mean, std=data.info.std, device=device)
    group_step = module.competitive_step if args.paradigm == "competitive" else module.mutual_step
    sums = capture.StepSums(device) if rt.cuda_graphs else None
    stats = engine.EpochStats(rt, sums=sums)
    state = {"step": 0}
    # the scripts' step reads the run's networks, optimizers, scaler, flags and runtime (lifecycle.RunState)
    run = types.SimpleNamespace(nets=nets, optimizers=optimizers, scaler=scaler, args=script_args, rt=rt)
    train_step = functools.partial(group_step, run)
    if rt.cuda_graphs:  # the statistics summed inside the graph too, as the scripts do (capture.capture_step)
        train_step = capture.CapturedStep(capture.summed(train_step, sums))

    def step():
        images, labels = next(batches)
        batch = perturber(state["step"], images, labels)
        state["step"] += 1
        stats.add(train_step(batch.inputs, labels, batch.labels_perm, batch.lams))

    step.precision = PRECISIONS[rt.amp_dtype]
    if rt.cuda_graphs:  # its warm-up calls, then the one that captures: none of them timed
        step.untimed = train_step.warmup + 1
    return step


def synchronize(device):
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(name, args, device, amp="auto"):
    """Images/s (median over repeats), warm-up time and peak memory of one variant (at precision
    `amp`, the --amp of the scripts; the reference is fp32)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    # The reference runs under PyTorch's defaults (no cuDNN autotuning, no TF32 matmuls), as the
    # authors' code did; the repository's variants set their own through utils.setup_runtime.
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    step = reference_steps(args, device) if name == "reference" else repository_steps(args, device, name == "fast", amp)
    # A captured step records its graph at the call after its own warm-up (capture.CapturedStep): the timing
    # starts after that call whatever --warmup says, so that no timed repeat includes the capture.
    untimed = max(args.warmup, getattr(step, "untimed", 0))
    start = time.perf_counter()
    for _ in range(untimed):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"variant": name, "amp": amp, "precision": getattr(step, "precision", "fp32"),
            "images_per_s": statistics.median(rates), "repeats": rates, "warmup_s": warmup_s, "warmup_steps": untimed,
            "peak_mem_mib": peak}


def run_config(args, device, report):
    """Time every requested variant of one configuration, reporting each as it finishes.

    A variant that fails (say, a compiler error on an untried card) is recorded with its error and
    the others still run, so one device call always brings back every figure it could measure.
    """
    run = {"paradigm": args.paradigm, "models": list(args.models), "batch_size": args.batch_size,
           "img_size": args.img_size, "num_classes": args.num_classes, "results": []}
    for name, amp in [(name, amp) for name in args.variants for amp in (["none"] if name == "reference" else args.amp)]:
        try:
            result = time_variant(name, args, device, amp)
        except Exception as error:  # noqa: BLE001 -- reported in the table and the JSON, not hidden
            result = {"variant": name, "amp": amp, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        base = next((r["images_per_s"] for r in run["results"] + [result]
                     if r["variant"] == "reference" and "error" not in r), None)
        if "error" not in result:
            result["vs_reference"] = result["images_per_s"] / base if base else None
        run["results"].append(result)
        report(run, result)
    return run


def cpu_has_native_bf16():
    """True when this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16); False
    when they are missing or cannot be queried. Reported with the CPU rows: even with AVX512-BF16,
    bf16 autocast trained the CIFAR ResNets no faster than fp32 (docs/speed.md). torch's public
    torch.backends.cpu.get_cpu_capability() names only the vector width, so this asks the cpuinfo
    queries behind it, which are private and were renamed between releases: guarded."""
    cpu = getattr(torch._C, "_cpu", None)
    try:
        capability = cpu._get_cpu_capability()  # recent torch: a dict of cpuinfo's flags
        return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        pass
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # older torch
        try:
            if getattr(cpu, query)():
                return True
        except (AttributeError, RuntimeError):
            pass
    return False


def describe(device):
    """The device, torch version and host, for every reported figure."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                                                                           f"{'' if cpu_has_native_bf16() else 'no '}native bf16)")
    return {"device": name, "torch": torch.__version__, "python": platform.python_version()}


def main(args):
    """Run the benchmark(s), print a table and optionally write JSON."""
    device = utils.resolve_device(args.device)
    configs = [args]
    if args.suite:
        pair = list(args.models[:2]) if len(args.models) >= 2 else ["resnet32", "resnet32"]
        configs = [argparse.Namespace(**{**vars(args), "models": pair}),
                   argparse.Namespace(**{**vars(args), "models": [pair[0]] * 4}),
                   argparse.Namespace(**{**vars(args), "models": pair, "img_size": 224})]
    info = describe(device)
    print(f"{info['device']}, torch {info['torch']}; synthetic data; group images/s (each network sees every image)")
    print(f"{'paradigm':<12} {'group':<28} {'batch':>5} {'px':>4} {'variant':<10} {'precision':<9} {'images/s':>10} {'x ref':>6} {'warm-up s':>9} {'peak MiB':>9}")
    runs = []

    def report(run, r):
        """Print one result row now and rewrite the JSON, so a run cut short keeps what it measured."""
        head = f"{run['paradigm']:<12} {' '.join(run['models']):<28} {run['batch_size']:>5} {run['img_size']:>4} {r['variant']:<10} {r.get('precision', r['amp']):<9}"
        if "error" in r:
            print(f"{head} failed: {r['error']}", flush=True)
        else:
            ratio = f"{r['vs_reference']:.1f}" if r["vs_reference"] else "-"
            peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] else "-"
            print(f"{head} {r['images_per_s']:>10.0f} {ratio:>6} {r['warmup_s']:>9.1f} {peak:>9}", flush=True)
        if args.json:
            checkpoints.save_json({**info, "runs": runs + [run]}, args.json)

    for config in configs:
        torch._dynamo.reset()  # forget the previous configuration's compiled graphs (and their memory)
        runs.append(run_config(config, device, report))
    return runs


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
