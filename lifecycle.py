"""A run from start to finish, for every training script: start_run resolves what the flags leave to
compute, builds the data, the networks, their optimizers and schedule, and opens (or resumes) the run
directory; epochs yields the epochs this invocation trains; finish writes the run's final files.

    run = lifecycle.start_run(args, my_step)            # the paradigm's step, bound to the run's networks
    for epoch in lifecycle.epochs(run):                 # until --epochs, or --stop-after N in this invocation
        stats = engine.train_one_epoch(run, epoch)      # a signal: last.pt saved mid-epoch, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)      # NaN/inf training statistics: exit 3, nothing saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)

The flags stay as parsed: what a run computes from them (the default learning rate, the data set's image
size, ramp-up lengths, ...) is built here, in `resolve`, into run.resolved, which args.json records apart.
"""
import datetime
import functools
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import capture
import checkpoints
import configs
import flags
import stopping
import utils
from ema import ModelEma
from engine import print_main
from errors import RunComplete, UsageError
from losses import sigmoid_rampup
from metrics import MetricsLog
from models import unwrap
from models.weights import net_labels
from perturb import Perturber


@dataclass
class RunState:
    """Plain data: the run's settings, its group, its parts, where it starts and what it has written."""
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
    resolved: dict = field(default_factory=dict)    # what the run computed from its flags (resolve)
    loaders: tuple = ()          # (train, val, test); val None without a validation split
    schedule: object = None      # utils.Schedule
    scaler: object = None        # the fp16 GradScaler (a pass-through otherwise)
    ema: object = None           # ema.ModelEma (--model-ema; empty when off)
    perturber: object = None     # perturb.Perturber of a script with the perturbation (--perturb-every)
    batch: object = None         # batch(run, global_step, images, labels) -> (the step's arguments, network whose BatchNorm keeps its statistics)
    train_step: object = None    # the paradigm's step bound to the run (captured with --cuda-graphs)
    stop: object = None          # stopping.StopRequest while the epochs run
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
    step_log: tuple = (0, None)  # the --log-every scalars' last (step count, host sums) in the epoch
    step_sums: object = None     # with --cuda-graphs, the StepSums its captured step adds to


def start_run(args, step, *, group=None, views="same", perturbation=False, batch=None, members=None, outputs=None,
              prepare=None, state=None, repeats=1, computed=None, min_lr=None):
    """Build a run of the paradigm whose training step is `step` and open its run directory (or, with
    --resume, restore it from the checkpoint); returns the RunState, whose train_step is `step` bound to it.

    step(run, *arguments) trains the run's networks one step and returns its statistics (a dict of device
    tensors); its arguments are run.batch's: (images, labels) by default (plain_batch), with `perturbation`
    the perturbed group inputs (inputs, labels, labels_perm, lams; perturbed_batch), or those of
    `batch(run, global_step, images, labels)`, which returns (arguments, None). What the scripts vary:
    group: the run's flags.Group (default: flags.check_args); views: --views ("independent": one augmented
    view of each batch per network) or a number of views; members, outputs: a branched network's rows and evaluation (engine.
    evaluate); prepare(net): run on each network before it is wrapped; state: the script's own resumable
    objects; repeats: repeated augmentation; computed: the script's own values computed from its flags
    (resolve); min_lr(peak rate): the cosine schedule's final fraction.
    """
    group = group or flags.check_args(args)
    if args.out_dir is not None:
        checkpoints.check_run_dir(args.out_dir)  # before any data or network is built
    rt = utils.setup_runtime(args)
    resolved = resolve(args, rt, len(group.names), computed)
    data, loaders = utils.setup_data(args, rt, eval_batch_size=resolved["eval_batch_size"],
                                     views=views if isinstance(views, int) else len(group.names) if views == "independent" else 1,
                                     repeats=repeats,
                                     rand_augment_impl=resolved.get("rand_augment_impl", "auto"))
    resolved.update(img_size=data.info.img_size, val_size=data.info.val_size, num_classes=data.info.num_classes,
                    **({"train_subset_rule": "first" if data.info.in_memory else "stratified"}
                       if args.train_subset is not None else {}))
    nets = utils.build_nets(group, data.info, rt, drop_path=args.drop_path, prepare=prepare)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt, lr=resolved["lr"])
    if min_lr is not None:
        resolved["min_lr"] = min_lr(peak_lrs[0])
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(loaders[0]), min_lr=resolved.get("min_lr"))
    parts = {"scaler": utils.make_scaler(rt), "ema": ModelEma(nets, args.model_ema, group.frozen)}
    if perturbation:
        parts["perturber"] = Perturber(every=args.perturb_every, ops=args.perturbations, num_nets=len(nets),
                                       seed=args.seed, mean=data.info.mean, std=data.info.std, device=rt.device)
    run = open_run(args, group, rt, data.info, nets, optimizers, len(loaders[0]), resolved, {**parts, **(state or {})},
                   members, outputs)
    run.loaders, run.schedule, run.scaler, run.ema = loaders, schedule, parts["scaler"], parts["ema"]
    run.perturber = parts.get("perturber")
    run.batch = batch or (perturbed_batch if perturbation else plain_batch)
    run.train_step = functools.partial(step, run)
    if rt.cuda_graphs:  # the whole step captured once, then replayed
        run.train_step = capture.capture_step(run, run.train_step)
    resume = checkpoints.resolve_resume(args)
    print_main(rt, describe_run(run, resume), *describe_nets(run, group, resume))
    return run


def resolve(args, rt, n, computed=None):
    """What the run computes from its flags, in this one place (args stay as parsed; args.json records these
    apart, and a repeat or a resume computes them again): the learning rates (--lr or the optimizer's
    default), the evaluation batch, the number of processes, then the script's own `computed` values
    (ramp-up lengths, ...). start_run adds the data set's image size, validation split and class count."""
    return {"lr": utils.default_lrs(args, n), "eval_batch_size": utils.eval_batch_size_of(args),
            "world_size": rt.world_size, **(computed or {})}


def plain_batch(run, global_step, images, labels):
    """A step's arguments when nothing is done to the batch: (images, labels); no network's BatchNorm is kept."""
    return (images, labels), None


def perturbed_batch(run, global_step, images, labels):
    """A step's arguments with the perturbation (section 3.2 of the paper): every --perturb-every global
    steps one random network's inputs are perturbed; the step gets (inputs, labels, labels_perm, lams), and
    that network's BatchNorm running statistics skip the batch (unless --update-bn-on-perturbed)."""
    perturbed = run.perturber(global_step, images, labels)
    keep = perturbed.net >= 0 and not run.args.update_bn_on_perturbed
    return (perturbed.inputs, labels, perturbed.labels_perm, perturbed.lams), run.nets[perturbed.net] if keep else None


def rampup_epochs(args):
    """--rampup-epochs, or its default: the official ONE and OKDDip codes' 80 of their 300 epochs, as a
    proportion of --epochs."""
    return args.epochs * 80 / 300 if args.rampup_epochs is None else args.rampup_epochs


def rampup_batch(run, global_step, images, labels):
    """A step's arguments for a method whose distillation weight ramps up (ONE, OKDDip, PCL): the batch and
    w(e) * --kd-weight of the step's epoch e (0-based), w the sigmoid ramp-up over run.resolved["rampup_epochs"]
    (losses.sigmoid_rampup), as a device scalar that a captured step reads anew."""
    weight = run.args.kd_weight * sigmoid_rampup(global_step // run.steps_per_epoch, run.resolved["rampup_epochs"])
    return (images, labels, torch.full((), weight, device=labels.device)), None


def open_run(args, group, rt, info, nets, optimizers, steps_per_epoch, resolved, state, members=None, outputs=None):
    """Open the run directory and, with --resume, restore the group, its optimizers and `state` (the
    script's own objects with state_dict()/load_state_dict()) from the checkpoint; returns the RunState.

    The run's members, one metrics row each (plus an ensemble row when there are several), are its
    networks; a branched network names its branches instead: members = [(label, architecture), ...],
    the first the deployed one (best.pt selects on it), and `outputs` evaluates them (engine.evaluate).
    """
    script = configs.script_of(args)
    resume = checkpoints.resolve_resume(args)
    run_dir = args.out_dir or (os.path.dirname(os.path.abspath(resume)) if resume else
                               checkpoints.default_run_dir(script, args.dataset, group.names))
    if resume:
        checkpoints.check_resume_target(run_dir, resume)
    saver = checkpoints.Checkpoints(run_dir, script=script, args=args, record=configs.record(args, resolved), info=info,
                                    names=group.names, nets=nets, optimizers=optimizers, rt=rt, state=state)
    members = members or list(zip(net_labels(group.names), group.names))
    run = RunState(args, rt, script, list(group.names), info, nets, optimizers, steps_per_epoch, run_dir, saver,
                   resolved=resolved, labels=[label for label, _ in members], models=[model for _, model in members],
                   outputs=outputs)
    if resume:
        try:
            run.start_epoch, run.start_step, run.resumed = saver.restore(resume)
        except RunComplete as complete:
            raise repair_complete_run(run, complete) if rt.is_main else complete from None
    if rt.distributed:
        check_same_resume_point(run)
    if rt.is_main:
        run.lock = checkpoints.prepare_run_dir(run_dir, fresh=resume is None, args=args)
        saver.copy_resumed_best()
        resumed = {"time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "checkpoint": resume,
                   "epoch": run.start_epoch, "step": run.start_step} if resume else None
        configs.save_args(args, resolved, run_dir, script, resumed=resumed)
    run.metrics = MetricsLog(run_dir, rt, run.start_epoch, resumed=resume is not None, args=args,
                             first_step=run.start_epoch * steps_per_epoch + run.start_step)
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
            f"CUDA graphs {'on' if rt.cuda_graphs else 'off'}; run dir {run.run_dir}" + (f"\n  {info.subset}" if info.subset else "")
            + (f"\n  --eval-subset: {info.eval_subset}; their accuracies are marked * (a subset's, not the split's)"
               if info.eval_subset else ""))


def describe_nets(run, group, resume):
    """One startup line per network: parameters, where its weights come from, its optimizer and peak rate."""
    lines = []
    for i, (label, net, optimizer) in enumerate(zip(run.labels, run.nets, run.optimizers)):
        params = sum(p.numel() for p in unwrap(net).parameters())
        init = group.init.get(i)
        start = ("weights of the checkpoint" if resume else
                 f"initialised from {init[0]}{'@' + init[1] if init[1] else ''}" if init else
                 "the library's pretrained weights (--pretrained)" if i in group.pretrained else "random initial weights")
        if optimizer is None:
            training = "frozen (--freeze: no optimizer, eval mode)"
        else:
            first = optimizer.param_groups[0]
            training = f"{type(optimizer).__name__} peak lr {float(first['lr']):.4g}, weight decay {first['weight_decay']:g}"
        lines.append(f"  {label}: {params / 1e6:.2f}M parameters, {start}, {training}")
    deployed = getattr(unwrap(run.nets[0]), "deployed_state_dict", None)
    if deployed is not None:  # a branched network: what is used after training, with its own size
        size = sum(v.numel() for k, v in deployed().items() if "running" not in k and "num_batches" not in k)
        lines.append(f"  deployed network: {run.labels[0]}, a plain {run.models[0]} of {size / 1e6:.2f}M parameters "
                     f"(deployed.pt at the end)")
    return lines


def epochs(run):
    """The epochs this invocation trains, from the first one not yet trained (a resume's) to --epochs,
    or --stop-after N of them; while they run, a signal is a stop request (run.stop): mid-epoch it saves
    last.pt after the current step and exits (engine.train_one_epoch), between epochs it saves the
    completed epochs and exits (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
    with stopping.StopRequest(run.rt) as stop:
        run.stop = stop
        for epoch in range(run.start_epoch, run.args.epochs):
            yield epoch
            if stop.requested() and epoch + 1 < run.args.epochs:  # a signal during evaluation or saving
                sys.exit(stopping.save_and_stop(run, stop, epoch + 1, 0))
            if stop_after(run, epoch):
                return


def stop_after(run, epoch):
    """True when this invocation ends after `epoch` (--stop-after N: N epochs per invocation)."""
    return run.args.stop_after is not None and epoch + 1 - run.start_epoch >= run.args.stop_after


def finish(run):
    """Close the run: its final files (write_final_files) once the last epoch of this invocation is trained,
    the last epoch's test accuracies printed; unlock the run directory. Returns the results."""
    results = write_final_files(run) if run.last_rows else None
    run.metrics.close(results)
    if run.lock:
        checkpoints.unlock_run_dir(*run.lock)
    if results is not None:
        subset = f", --eval-subset: {run.info.eval_subset}" if run.info.eval_subset else ""
        print_main(run.rt, f"final test accuracy (last epoch{subset}): " + ", ".join(
            f"{e['net']} {e['final_test_acc']:.2f}%" for e in results["networks"]))
    return results


def final_files(run):
    """The files a finished run writes at its end: results.json, and for a network trained as several
    (ONE, OKDDip, PCL, BYOT) its deployed part as a plain network, deployed.pt."""
    return ["results.json"] + (["deployed.pt"] if hasattr(unwrap(run.nets[0]), "deployed_state_dict") else [])


def write_final_files(run):
    """Write final_files from the run's last epoch (its rows, the best-validation record, the networks' weights);
    the same files whenever it is called (at the end of training, or to repair a run killed before they were
    written). deployed.pt only once the run's last epoch is trained. Returns the results."""
    results = results_record(run.run_dir, run.script, run.info.name, run.info.synthetic, run.last_rows,
                             run.checkpoints.best, len(run.nets))
    if run.info.eval_subset:  # accuracies of a subset of the splits, never to be read as the splits'
        results["eval_subset"] = run.info.eval_subset
    if run.last_ema_rows:
        results["ema"] = [{"net": row["net"], "model": row["model"], "final_test_acc": row["test_acc"],
                           "final_val_acc": row.get("val_acc")} for row in run.last_ema_rows]
    if run.rt.is_main:
        if "deployed.pt" in final_files(run) and run.last_rows[0]["epoch"] == run.args.epochs:
            deployed = {key: value.detach().cpu() for key, value in unwrap(run.nets[0]).deployed_state_dict().items()}
            checkpoints.atomic_save(deployed, os.path.join(run.run_dir, "deployed.pt"))
        checkpoints.save_json(results, os.path.join(run.run_dir, "results.json"))
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


def repair_complete_run(run, complete):
    """--resume auto on a complete run some of whose final files are missing (killed after its last
    checkpoint): restore the networks and the run's last rows from last.pt and write them
    (write_final_files), so that finishing is idempotent. Returns the RunComplete (or UsageError) to raise."""
    ckpt = complete.checkpoint
    missing = [name for name in final_files(run) if not os.path.exists(os.path.join(run.run_dir, name))]
    if ckpt is None or not missing:
        return complete
    rows = ckpt["state"].get("rows")  # the last epoch's rows, as finish() would have written them
    if not rows:
        return UsageError(f"{complete}; its {' and '.join(missing)} missing, and its last.pt holds no metrics rows to "
                          f"write them from")
    for net, weights in zip(run.nets, ckpt["nets"]):
        unwrap(net).load_state_dict(weights)
    run.last_rows, run.last_ema_rows = rows, ckpt["state"].get("ema_rows", [])
    run.checkpoints.best = ckpt["state"]["best"]
    write_final_files(run)
    return RunComplete(f"{complete}; its {' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} missing and "
                       f"{'is' if len(missing) == 1 else 'are'} written now")
