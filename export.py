"""Export a run's trained networks as files that need none of this repository's training code.

Each network of the run's checkpoint (best.pt, each network at its best validation epoch, by
default; last.pt with --which last) becomes a .safetensors file of its state_dict (the format of
timm's and the Hugging Face hub's weight files) and a JSON file beside it that says how to rebuild
and feed it: the model name models.create_model takes, the class count and input geometry, the class
names, the normalisation, its accuracies (results.json), the epoch of its weights and the run's
arguments. A branched ONE/OKDDip/PCL network or a BYOT network with exits is exported as its deployed
branch: a plain network of its base architecture. --format onnx writes each network as ONNX too (dynamic batch), checked against
PyTorch with onnxruntime when it is installed. Every file is written under a temporary name and
renamed into place at the end: an export that fails leaves none of its files.

    python export.py runs/train-cifar100-resnet32-20250101-120000
    python export.py runs/my-run --which last --format onnx --out exported/my-run

Rebuilding a network from its files (docs/usage.md, "Sharing trained networks"):

    net = models.create_model(meta["model"], num_classes=meta["num_classes"], img_size=meta["img_size"],
                              in_chans=meta["in_chans"])
    net.load_state_dict(safetensors.torch.load_file("net0_resnet32.safetensors"))
"""
import fnmatch
import hashlib
import importlib.util
import inspect
import json
import os

import torch

import checkpoints
import configs
import flags
import models
import stopping
from errors import RunFailure, UsageError
from models.weights import net_labels

EXPORT_FORMAT = 1  # the version of the JSON files' keys
RUN_MARKERS = ("args.json", "metrics.csv", "results.json", "last.pt", "best.pt")  # what makes a run directory
# ONNX against PyTorch: the tolerance of PyTorch's ONNX tutorial ("Exporting a model from PyTorch to
# ONNX and running it using ONNX Runtime": np.testing.assert_allclose(..., rtol=1e-03, atol=1e-05)).
ONNX_RTOL, ONNX_ATOL = 1e-3, 1e-5
# Batch sizes of the check, other than the export example's 2, so that the dynamic batch is exercised.
ONNX_CHECK_BATCHES = (1, 3)


def get_args_parser():
    """Flags: which run, which checkpoint, which formats, where to (a usage error is one line, exit code 2)."""
    parser = flags.ArgumentParser(description="Export a run's trained networks as .safetensors (+ JSON, + ONNX) files.",
                                     formatter_class=flags.HelpFormatter)
    add = parser.add_argument
    add("run_dir", metavar="RUN_DIR", help="a run directory of this repository's training scripts")
    add("--which", default="best", choices=["best", "last"],
        help="checkpoint: best.pt (each network at its best validation accuracy; last.pt when the run had "
             "no validation split) or last.pt")
    add("--format", default="safetensors", choices=["safetensors", "onnx"],
        help="safetensors: <label>.safetensors + <label>.json per network; onnx: also <label>.onnx (needs the "
             "onnx and onnxscript packages; checked with onnxruntime when installed)")
    add("--out", default=None, help="directory of the exported files (default: <RUN_DIR>/export)")
    return parser


# ----------------------------------------------------------------------------------------------
# The run, its checkpoint and where the files go
# ----------------------------------------------------------------------------------------------
def find_checkpoint(run_dir, which):
    """The checkpoint file of `run_dir` that --which names; UsageError in one line when there is none."""
    if not os.path.isdir(run_dir):
        if os.path.isfile(run_dir):
            raise UsageError(f"'{run_dir}' is a file; pass the run directory that holds it "
                             f"('{os.path.dirname(run_dir) or '.'}'; --which best|last picks the checkpoint)")
        raise UsageError(f"run directory '{run_dir}' does not exist")
    names = ["best.pt", "last.pt"] if which == "best" else ["last.pt"]
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            if name != names[0]:
                record = checkpoints.load_checkpoint(path, mmap=True)
                validated = {**record["args"], **record.get("resolved", {})}.get("val_size")
                why = ("its best.pt is missing, though the run had a validation split (deleted?)" if validated
                       else "it has no best.pt (the run had no validation split)")
                print(f"note: '{run_dir}': {why}: exporting its last.pt")
            return path
    if not any(os.path.exists(os.path.join(run_dir, marker)) for marker in RUN_MARKERS):
        raise UsageError(f"'{run_dir}' is not a run directory of this repository's scripts "
                         f"(it holds no {', '.join(RUN_MARKERS)})")
    other = " (its best.pt is exported with --which best)" if os.path.isfile(os.path.join(run_dir, "best.pt")) else ""
    raise UsageError(f"run '{run_dir}' holds no {' or '.join(names)}{other}: nothing to export "
                     f"(a run writes its checkpoint at the end of its first epoch)")


def check_out_dir(out):
    """UsageError in one line unless `out` is a writable directory or one that can be created."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"--out '{out}' is a file, not a directory; choose another --out")
    existing = os.path.abspath(out)
    while not os.path.lexists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out '{out}' cannot be created: '{existing}' is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{out}' is not writable ('{existing}' is not); choose another --out")


# The flags a checkpoint of one run may record differently (a resume may change them, one invocation sets them).
PER_RUN_IGNORED = set(configs.RESUME_MAY_CHANGE) | set(configs.PER_INVOCATION)


def check_same_run(run_dir, path, ckpt):
    """UsageError in one line when the checkpoint is not of the run whose directory holds it: its flags differ
    from the directory's last.pt's (a best.pt copied or linked from another run), or from its args.json."""
    flags_of = lambda record: {key: value for key, value in record.items() if key not in PER_RUN_IGNORED}
    others = []
    last = os.path.join(run_dir, "last.pt")
    if os.path.isfile(last) and os.path.realpath(last) != os.path.realpath(path):
        others.append((last, checkpoints.load_checkpoint(last, mmap=True)["args"]))
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            others.append((os.path.join(run_dir, "args.json"), json.load(f)))
    except (OSError, ValueError):
        pass
    mine = flags_of(json.loads(json.dumps(ckpt["args"], default=str)))
    for other, record in others:
        theirs = flags_of(json.loads(json.dumps(record, default=str)))
        differ = next((key for key in mine if key in theirs and mine[key] != theirs[key]), None)
        if differ is not None:
            raise UsageError(f"'{path}' is not of the run in '{run_dir}': its --{differ.replace('_', '-')} is "
                             f"{mine[differ]!r}, {os.path.basename(other)}'s {theirs[differ]!r} (a checkpoint copied or "
                             f"linked from another run?); nothing was exported")


def check_out_holds_this_run(out, ckpt):
    """UsageError in one line when --out holds another run's files (a run directory's, or another run's export:
    its files would mix with this one's); an earlier export of this run is replaced, other files stay."""
    if not os.path.isdir(out):
        return
    mine = json.loads(json.dumps(ckpt["args"], default=str))
    names = sorted(os.listdir(out))
    theirs = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in checkpoints.RUN_FILES)]
    for name in names:
        if name.endswith(".json") and name not in theirs:
            try:
                with open(os.path.join(out, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and "export_format" in record and record.get("args") != mine:
                theirs += [name] + [record[key] for key in ("weights", "onnx") if record.get(key) in names]
    if theirs:
        raise UsageError(f"--out '{out}' holds another run's files ({', '.join(sorted(set(theirs))[:3])}"
                         f"{', ...' if len(set(theirs)) > 3 else ''}): its export would mix with them; export into an "
                         f"empty directory or this run's own")


def check_onnx_packages():
    """UsageError in one line unless torch.onnx's torch.export-based exporter can run (it needs onnx and onnxscript)."""
    needed = {"dynamo", "dynamic_shapes", "external_data"}  # the torch.export-based exporter's arguments used here
    if not needed <= set(inspect.signature(torch.onnx.export).parameters):
        raise UsageError(f"--format onnx needs a newer torch (this {torch.__version__} has no "
                         f"torch.onnx.export(dynamo=True, dynamic_shapes=..., external_data=...))")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--format onnx needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)} "
                         f"(torch.onnx's exporter): pip install onnx onnxscript (and onnxruntime, which checks the export)")


def read_results(run_dir, ckpt):
    """results.json's per-network entries when they describe the checkpoint's weights (None for a run without
    one, one that has not finished, or one whose results are of other weights: a note says which)."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
        networks, epochs = results["networks"], results.get("epochs")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"note: '{path}' is unreadable ({type(error).__name__}); the accuracies are left out")
        return None
    best = ckpt["state"].get("best")
    if ckpt["optimizers"] or best is None:  # last.pt: the results of its epoch only
        same = epochs == ckpt["epoch"] and ckpt["step"] == 0
    else:  # best.pt: each network's best epoch as results.json records it
        same = [n.get("best_epoch") for n in networks[:len(best["epoch"])]] == list(best["epoch"])
    if not same:
        where = f"epoch {ckpt['epoch']}" + (f" step {ckpt['step']}" if ckpt["step"] else "")
        print(f"note: '{path}' describes other weights than the checkpoint's (results of epoch {epochs}, weights of "
              f"{where}): the accuracies are left out")
        return None
    return networks


# ----------------------------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------------------------
def exported_networks(ckpt, path):
    """[(model name, name in the run, eval-mode network)] of a checkpoint: each network rebuilt by name
    with its weights; a branched one (or one with exits) as its deployed part, a plain network of its base
    architecture."""
    exported = []
    for i, (name, state) in enumerate(zip(ckpt["models"], ckpt["nets"])):
        geometry = dict(num_classes=ckpt["num_classes"], img_size=ckpt["img_size"], in_chans=ckpt["in_chans"])
        try:
            net = models.create_model(name, **geometry)
            net.load_state_dict(state)
            if hasattr(net, "deployed_state_dict"):  # ONE, OKDDip, PCL, BYOT: one network trained as several
                deployed, base = net.deployed_state_dict(), net.base
                net = models.create_model(base, **geometry)
                net.load_state_dict(deployed)
            else:
                base = name
        except (ValueError, RuntimeError, ImportError) as error:
            # a renamed model or changed architecture since training: say which network, briefly
            raise UsageError(f"'{path}' network {i} ({name}) cannot be rebuilt: {str(error).splitlines()[0][:160]}") from None
        exported.append((base, name, net.eval()))
    return exported


def weight_epochs(ckpt):
    """Per network, (epochs, steps) of training its weights had: best.pt (the only checkpoint without
    optimizer state) holds each network at its own best epoch; last.pt all at its epoch and step."""
    best = ckpt["state"].get("best")
    if not ckpt["optimizers"] and best is not None:
        return [(epoch, 0) for epoch in best["epoch"]]
    return [(ckpt["epoch"], ckpt["step"])] * len(ckpt["nets"])


def sample_inputs(ckpt, batch):
    """`batch` images of the run's geometry as the networks see them: pixels uniform in [0, 1] (a fixed
    seed), normalised with the run's mean and std."""
    shape = (batch, ckpt["in_chans"], ckpt["img_size"], ckpt["img_size"])
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(batch))
    return (pixels - torch.tensor(ckpt["mean"]).view(1, -1, 1, 1)) / torch.tensor(ckpt["std"]).view(1, -1, 1, 1)


def onnx_model(net, ckpt, label):
    """The eval-mode network as ONNX bytes: torch.onnx.export (the torch.export-based exporter) of one
    input 'images' (B, C, H, W) at the run's geometry, B dynamic, to one output 'logits' (B, classes)."""
    example = sample_inputs(ckpt, 2)
    try:
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
        return program.model_proto.SerializeToString()
    except Exception as error:  # the exporter raises many types: an unsupported operator, a fixed batch, > 2 GB
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else "no message"
        raise RunFailure(f"{label} cannot be exported to ONNX ({type(error).__name__}: {detail}); nothing was written") from None


def check_onnx(model, net, ckpt, label):
    """Run the ONNX bytes with onnxruntime on test-like inputs and compare with PyTorch's logits: the
    check's record for the JSON, None when onnxruntime is not installed; RunFailure when they disagree."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in ONNX_CHECK_BATCHES:
        images = sample_inputs(ckpt, batch)
        with torch.no_grad():
            expected = net(images).float()
        got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=ONNX_RTOL, atol=ONNX_ATOL):
            difference = (got - expected).abs().max().item() if got.shape == expected.shape else f"shape {tuple(got.shape)}"
            raise RunFailure(f"{label}: the ONNX export's logits differ from PyTorch's (max |difference| {difference} on a "
                             f"batch of {batch}, beyond rtol {ONNX_RTOL} atol {ONNX_ATOL}); nothing was written")
        worst = max(worst, (got - expected).abs().max().item())
    return {"inputs": sum(ONNX_CHECK_BATCHES), "max_abs_diff": worst, "rtol": ONNX_RTOL, "atol": ONNX_ATOL,
            "onnxruntime": onnxruntime.__version__}


def description(label, name, trained_as, net_index, ckpt, which, epoch, results, files):
    """The JSON beside a network's weights: how to rebuild and feed it, and where it comes from."""
    entry = results[net_index] if results is not None and net_index < len(results) else None
    return {"export_format": EXPORT_FORMAT, "label": label, "model": name,
            "num_classes": ckpt["num_classes"], "img_size": ckpt["img_size"], "in_chans": ckpt["in_chans"],
            "classes": list(ckpt["classes"]), "mean": list(ckpt["mean"]), "std": list(ckpt["std"]),
            "dataset": ckpt["dataset"], "trained_as": trained_as, "script": ckpt["script"], "checkpoint": which,
            "epoch": epoch[0], "step": epoch[1],
            "results": None if entry is None else {k: v for k, v in entry.items() if k not in ("net", "model")},
            **files, "torch": torch.__version__, "args": ckpt["args"]}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_files(out, files):
    """Write {file name: bytes} into directory `out`, all or none: each into a temporary file (flushed
    to disk), then each renamed over its name; an error removes the temporary files, those already
    renamed and the directories made for them, and says so in one line."""
    staged, placed, current, made = [], [], out, []
    folder = os.path.abspath(out)
    while not os.path.lexists(folder):  # the directories makedirs creates, deepest first
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out, exist_ok=True)
        for name, data in files.items():
            current = os.path.join(out, name)
            staged.append(f"{current}.tmp{os.getpid()}")
            with open(staged[-1], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, name in zip(staged, files):
            current = os.path.join(out, name)
            os.replace(tmp, current)
            placed.append(current)
    except OSError as error:  # a full or read-only disk
        for path in staged + placed:
            if os.path.exists(path):
                os.remove(path)
        for folder in made:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise RunFailure(f"could not write '{current}': {error.strerror or error}; nothing was exported") from None


def summary(record, out):
    """One line on an exported network: its files, model, epoch and test accuracy (when results.json has it)."""
    line = f"wrote {os.path.join(out, record['weights'])} + .json{' + .onnx' if 'onnx' in record else ''}: {record['model']}"
    if record["trained_as"] != record["model"]:
        line += f" (the deployed branch of {record['trained_as']})"
    line += f", epoch {record['epoch']}" + (f"+{record['step']} steps" if record["step"] else "")
    # best.pt's weights are those of the best validation epoch: the test accuracy of that epoch
    key = "test_acc_at_best_val" if record["checkpoint"] == "best.pt" else "final_test_acc"
    accuracy = (record["results"] or {}).get(key)
    if accuracy is not None:
        line += f", test accuracy {accuracy:.2f}%"
    if record.get("onnx_check"):
        line += f", ONNX checked (max |difference| {record['onnx_check']['max_abs_diff']:.1e})"
    return line


def main(args):
    """Export every network of the run's checkpoint into --out; returns {file name: JSON record}."""
    path = find_checkpoint(args.run_dir, args.which)
    out = args.out or os.path.join(args.run_dir, "export")
    check_out_dir(out)
    if args.format == "onnx":
        check_onnx_packages()
    try:
        import safetensors.torch
    except ImportError:
        raise UsageError("export.py needs the safetensors package: pip install safetensors") from None
    ckpt = checkpoints.load_checkpoint(path)
    check_same_run(args.run_dir, path, ckpt)
    check_out_holds_this_run(out, ckpt)
    results, epochs = read_results(args.run_dir, ckpt), weight_epochs(ckpt)
    networks = exported_networks(ckpt, path)
    labels = net_labels([name for name, _, _ in networks])
    files, records, unchecked = {}, {}, False
    for i, (label, (name, trained_as, net)) in enumerate(zip(labels, networks)):
        # contiguous copies: safetensors stores each tensor whole and refuses tensors that share memory
        state = {key: value.detach().clone(memory_format=torch.contiguous_format) for key, value in net.state_dict().items()}
        geometry = {key: str(ckpt[key]) for key in ("num_classes", "img_size", "in_chans")}
        weights = safetensors.torch.save(state, metadata={"format": "pt", "model": name, **geometry})
        named = {"weights": f"{label}.safetensors", "weights_sha256": hashlib.sha256(weights).hexdigest()}
        files[named["weights"]] = weights
        if args.format == "onnx":
            model = onnx_model(net, ckpt, label)
            named.update(onnx=f"{label}.onnx", onnx_check=check_onnx(model, net, ckpt, label))
            unchecked |= named["onnx_check"] is None
            files[named["onnx"]] = model
        records[f"{label}.json"] = description(label, name, trained_as, i, ckpt, os.path.basename(path), epochs[i],
                                               results, named)
        files[f"{label}.json"] = (json.dumps(records[f"{label}.json"], indent=2, default=str) + "\n").encode()
    write_files(out, files)
    for record in records.values():
        print(summary(record, out))
    if unchecked:
        print("note: onnxruntime is not installed: the .onnx files were not checked against PyTorch (pip install onnxruntime)")
    return records


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
