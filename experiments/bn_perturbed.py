"""What one perturbed batch in BatchNorm's running statistics does to a network's test accuracy.

In the authors' code the perturbed network's forward also updated its BatchNorm running statistics,
and with 351 steps per CIFAR epoch and a perturbation every 10 steps the epoch's last step (350)
is always a perturbed one, so every end-of-epoch evaluation normalised with statistics 10% made of
a perturbed batch. This script isolates that effect on a trained checkpoint: for each network and
each of --batches training batches it runs one train-mode forward (weights untouched, running
statistics updated with the network's momentum) of the clean batch, or of the batch under each
perturbation, and measures test accuracy after it.

    python experiments/bn_perturbed.py runs/study/cd/seed0/last.pt --batches 3
"""
import argparse
import copy
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python experiments/bn_perturbed.py` from anywhere
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import checkpoints  # noqa: E402
import demo  # noqa: E402
import engine
import utils  # noqa: E402
from datasets import make_loaders  # noqa: E402
from perturb import PERTURBATIONS, perturb  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a last.pt or best.pt of this repository")
    parser.add_argument("--batches", type=int, default=3, help="training batches per condition")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", default=None, help="where the training data is (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args):
    ckpt = checkpoints.load_checkpoint(args.checkpoint)
    data = demo.load_test_data(ckpt, types.SimpleNamespace(download=None, data_dir=args.data_dir))
    train_loader, _, test_loader = make_loaders(data, batch_size=args.batch_size, device="cpu", seed=args.seed, workers=0)
    rt = utils.Runtime(torch.device("cpu"), None, False)
    nets = demo.build_group([args.checkpoint], [ckpt], torch.device("cpu"))
    batches = [batch for _, batch in zip(range(args.batches), train_loader)]
    generator, params = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    conditions = {"clean": lambda x, y: x}
    conditions.update({op: (lambda op: lambda x, y: perturb(x, y, op, mean=data.info.mean, std=data.info.std,
                                                           generator=generator, param_generator=params)[0])(op)
                       for op in PERTURBATIONS})
    results = {"as saved": []} | {name: [] for name in conditions}
    for net in nets:
        saved = copy.deepcopy(net.state_dict())
        results["as saved"].append(engine.evaluate([net], test_loader, rt)[0]["acc"])
        for name, make_input in conditions.items():
            for images, labels in batches:
                net.load_state_dict(saved)
                with torch.no_grad():
                    net.train()(make_input(images, labels))  # the step's forward: running statistics move
                results[name].append(engine.evaluate([net], test_loader, rt)[0]["acc"])
        net.load_state_dict(saved)
    clean = sum(results["clean"]) / len(results["clean"])
    print(f"{args.checkpoint}: {len(nets)} network(s) x {args.batches} batch(es); test accuracy (%) after one "
          "train-mode forward of the batch (weights unchanged)")
    print("| batch in the running statistics | test acc | vs clean |\n|---|---|---|")
    for name, values in results.items():
        mean = sum(values) / len(values)
        print(f"| {name} | {mean:.2f} (min {min(values):.2f}) | {mean - clean:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
