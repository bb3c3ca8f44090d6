"""The pieces of the CUDA-graph fast path: device-tensor learning rates, the captured group step
against the eager one (captured on a GPU; on the CPU the same test with the capture switched off)."""
import argparse
import functools

import pytest
import torch
import torch.nn.functional as F

import capture
import checkpoints
import flags
import models
import stopping
import train
import train_competitive_distillation as competitive
import losses
import utils
from helpers import DEVICES, step_run


def schedule_args(**kwargs):
    values = dict(epochs=2, warmup_epochs=0.5, schedule="cosine", milestones=[0.5], gamma=0.1, min_lr=0.0)
    values.update(kwargs)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_tensor_lr_optimizer_matches_plain(name):
    torch.manual_seed(0)
    plain_net = torch.nn.Linear(5, 3)
    fused_net = torch.nn.Linear(5, 3)
    fused_net.load_state_dict(plain_net.state_dict())
    plain = utils.build_optimizer(plain_net, name, 0.1, 1e-4)
    fused = utils.build_optimizer(fused_net, name, 0.1, 1e-4, fused=True, capturable=True)
    assert isinstance(fused.param_groups[0]["lr"], torch.Tensor)
    # Adam-type step() refuses CUDA graph capture unless the groups are capturable; SGD has no such flag
    assert fused.param_groups[0].get("capturable", False) == (name == "adamw")
    schedules = [utils.Schedule(schedule_args(), opt, [0.1], steps_per_epoch=4) for opt in ([plain], [fused])]
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    lr_tensor = fused.param_groups[0]["lr"]
    for step in range(6):
        for schedule, net, opt in zip(schedules, (plain_net, fused_net), (plain, fused)):
            schedule.step(step)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        assert fused.param_groups[0]["lr"] is lr_tensor          # written in place, never replaced
        assert lr_tensor.item() == pytest.approx(plain.param_groups[0]["lr"])
    for a, b in zip(plain_net.parameters(), fused_net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# The optimizer kinds a run builds: foreach on the CPU, fused on CUDA, fused and capturable with --cuda-graphs.
KERNELS = {"foreach": {}, "fused": {"fused": True}, "graphs": {"fused": True, "capturable": True}}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("written", KERNELS)
@pytest.mark.parametrize("resumed", KERNELS)
def test_resume_keeps_this_runs_kernels_and_rate_tensor(name, written, resumed):
    """A checkpoint carries the writing run's kernels; resuming on another device or with or without
    --cuda-graphs keeps the resuming run's (fused, capturable, the very lr tensor a graph reads) and
    its moments load."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    writer_net = torch.nn.Linear(5, 3)
    writer = utils.build_optimizer(writer_net, name, 0.1, 1e-4, **KERNELS[written])
    F.cross_entropy(writer_net(x), y).backward()
    writer.step()
    net = torch.nn.Linear(5, 3)
    net.load_state_dict(writer_net.state_dict())
    optimizer = utils.build_optimizer(net, name, 0.1, 1e-4, **KERNELS[resumed])
    built = [dict(group) for group in optimizer.param_groups]
    checkpoints.load_optimizer_state(optimizer, writer.state_dict())
    for group, before in zip(optimizer.param_groups, built):
        for key in checkpoints.RUN_OWNED_GROUP_KEYS:
            assert group.get(key) is before.get(key), key  # the same objects, the lr tensor included
    moment = "momentum_buffer" if name == "sgd" else "exp_avg"
    written = next(iter(writer.state.values()))[moment]
    assert torch.equal(next(iter(optimizer.state.values()))[moment], written)
    schedule = utils.Schedule(schedule_args(), [optimizer], [0.1], steps_per_epoch=4)
    schedule.step(5)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()  # the loaded state works with this run's kernels
    rate = optimizer.param_groups[0]["lr"]
    assert float(rate) == pytest.approx(0.1 * utils.lr_factor(5, **schedule.kwargs))


@pytest.fixture
def made_optimizers(monkeypatch):
    """The keyword arguments of every SGD/AdamW built (the real class is still built)."""
    made = []
    for name in ("SGD", "AdamW"):
        def build(params, _cls=getattr(torch.optim, name), _name=name, **kwargs):
            made.append((_name, kwargs))
            return _cls(params, **kwargs)
        monkeypatch.setattr(torch.optim, name, build)
    return made


@pytest.mark.parametrize("device, amp, graphs, expected", [
    ("cpu", None, False, {"SGD": {"foreach": True}, "AdamW": {"foreach": True}}),
    ("cuda", torch.bfloat16, False, {"SGD": {"fused": True}, "AdamW": {"fused": True}}),
    ("cuda", None, True, {"SGD": {"fused": True}, "AdamW": {"fused": True, "capturable": True}}),
    ("cuda", torch.float16, False, {"SGD": {"foreach": True}, "AdamW": {"fused": True}}),
], ids=["cpu", "cuda", "cuda-graphs", "cuda-fp16"])
def test_optimizers_are_fused_on_cuda(made_optimizers, device, amp, graphs, expected):
    """Fused SGD/AdamW on CUDA by default (float rate); with --cuda-graphs the rate is a device tensor
    and AdamW capturable; foreach on the CPU, and for SGD under fp16 loss scaling (see use_fused).
    The device is only claimed: the networks stay on the CPU."""
    args = competitive.get_args_parser().parse_args(["--optimizer", "sgd", "adamw"])
    rt = utils.Runtime(torch.device(device, 0) if device == "cuda" else torch.device(device), amp, False,
                       cuda_graphs=graphs)
    utils.build_optimizers(args, [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)], rt)
    assert [name for name, _ in made_optimizers] == ["SGD", "AdamW"]
    for name, kwargs in made_optimizers:
        assert {k: kwargs[k] for k in ("foreach", "fused", "capturable") if k in kwargs} == expected[name], name
        assert isinstance(kwargs["lr"], torch.Tensor) == graphs, name


def test_fp16_scaled_steps_skip_an_overflowing_first_step_cleanly(monkeypatch):
    """--amp fp16 on CUDA: the optimizers build_optimizers makes (fused AdamW, foreach SGD), stepped
    through GradScaler, leave no trace of a first step that overflowed, and later steps equal plain
    unscaled steps. Fused AdamW takes the scaler's inf flag as a tensor: no .item() read-back."""
    args = competitive.get_args_parser().parse_args(["--optimizer", "sgd", "adamw", "--lr", "0.1", "0.01"])
    rt = utils.Runtime(torch.device("cuda", 0), torch.float16, False)   # claimed: the networks stay on the CPU
    torch.manual_seed(0)
    nets, references = [torch.nn.Linear(4, 2) for _ in range(2)], [torch.nn.Linear(4, 2) for _ in range(2)]
    for net, reference in zip(nets, references):
        reference.load_state_dict(net.state_dict())
    optimizers, _ = utils.build_optimizers(args, nets, rt)
    plain, _ = utils.build_optimizers(args, references, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def no_host_read(self):
        raise AssertionError("a host read-back in the scaled step")

    for step, overflow in enumerate([True, False, False]):
        for net, optimizer, reference, plain_optimizer in zip(nets, optimizers, references, plain):
            optimizer.zero_grad()
            scaler.scale(F.cross_entropy(net(x), y) * (float("inf") if overflow else 1.0)).backward()
            if not overflow:
                plain_optimizer.zero_grad()
                F.cross_entropy(reference(x), y).backward()
                plain_optimizer.step()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", no_host_read)
            scaler.step(optimizers[1])                                  # fused AdamW
        scaler.step(optimizers[0])                                      # foreach SGD reads its flag back
        scaler.update()
        for net, reference in zip(nets, references):
            for a, b in zip(net.parameters(), reference.parameters()):
                torch.testing.assert_close(a, b, msg=f"step {step}")
    assert scaler.get_scale() == 2.0**9


def test_cuda_graphs_refused_on_the_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(train.main, train.get_args_parser(), ["--dataset", "fake", "--device", "cpu", "--cuda-graphs"])
    assert exit_info.value.code == 2
    assert "--cuda-graphs needs one CUDA process" in capsys.readouterr().err


def eager_fp32_step(nets, optimizers, images, labels):
    """The authors' way, spelled out: fp32, losses read back, teachers chosen in Python, each
    network's backward and step in turn. Returns the per-network CE and teacher lists."""
    logits = [net(images) for net in nets]
    ce = [F.cross_entropy(z, labels) for z in logits]
    values = [c.item() for c in ce]
    teachers = [[j for j in range(len(nets)) if values[j] < values[i]] for i in range(len(nets))]
    for i, (optimizer, chosen) in enumerate(zip(optimizers, teachers)):
        kd = sum(losses.kd_loss(logits[i], logits[j]) for j in chosen) / max(len(chosen), 1)
        optimizer.zero_grad()
        (ce[i] + kd).backward()  # the teachers' logits are detached: only network i's graph is used
        optimizer.step()
    return values, teachers


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_step_matches_the_eager_fp32_step(amp_dtype):
    """Same weights and batches: the repository's step (channels_last, one backward, fused optimizers
    with device-tensor rates, masks instead of Python branches; bf16 autocast when asked) gives the
    eager fp32 loop's losses, teachers and updates: tightly in fp32, loosely in bf16."""
    args = competitive.get_args_parser().parse_args(["--models", "resnet20", "resnet20", "resnet20"])
    rt = utils.Runtime(torch.device("cpu"), amp_dtype, True)

    def group():
        torch.manual_seed(5)
        nets = [models.create_model("resnet20", num_classes=10, img_size=16, in_chans=3) for _ in range(3)]
        return nets, [utils.build_optimizer(net, "sgd", 0.1, 5e-4) for net in nets]

    (eager_nets, eager_opts), (fast_nets, _) = group(), group()
    fast_nets = [net.to(memory_format=torch.channels_last) for net in fast_nets]
    fast_opts = [utils.build_optimizer(net, "sgd", 0.1, 5e-4, fused=True, capturable=True) for net in fast_nets]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    # Update direction vs fp32: bf16 rounding alone gives cosines of 0.977-0.994 here, while dropping
    # the distillation term from a student's loss gives 0.92-0.95, so 0.97 still tells them apart.
    ce_tol, update_cos = (1e-5, 0.9999) if amp_dtype is None else (1e-2, 0.97)
    for step in range(3):
        before = [torch.cat([p.detach().flatten() for p in net.parameters()]) for net in eager_nets]
        images = torch.randn(16, 3, 16, 16, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        ce, teachers = eager_fp32_step(eager_nets, eager_opts, images, labels)
        gaps = sorted(abs(a - b) for a in ce for b in ce if a != b)
        assert gaps[0] > 2 * ce_tol  # the three losses are far enough apart for the ranking to be stable
        stats = competitive.competitive_step(step_run(fast_nets, fast_opts, scaler, args, rt),
                                             [utils.to_input(images, rt)] * 3, labels, labels, torch.ones(3))
        assert torch.allclose(stats["ce"], torch.tensor(ce), atol=ce_tol, rtol=0), (step, stats["ce"], ce)
        assert stats["teachers"].tolist() == [float(len(t)) for t in teachers]
        assert stats["leader_share"].argmax().item() == min(range(3), key=ce.__getitem__)
        for net_e, net_f, old in zip(eager_nets, fast_nets, before):
            new_e = torch.cat([p.detach().flatten() for p in net_e.parameters()])
            new_f = torch.cat([p.detach().flatten() for p in net_f.parameters()])
            cos = F.cosine_similarity(new_e - old, new_f - old, dim=0).item()
            assert cos > update_cos, (step, cos)
            with torch.no_grad():  # realign, so each step compares one update from identical weights
                for p_e, p_f in zip(net_e.parameters(), net_f.parameters()):
                    p_f.copy_(p_e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_competitive_step_matches_eager(device, optimizer, amp_dtype):
    """Same weights, same batches: the script's step called as the scripts call it, step(inputs,
    labels, labels_perm, lams), through capture.CapturedStep tracks the eager step, replays of a perturbed
    (mixup) batch and of rate changes included. On the CPU the capture is off (the same warm-up and
    static inputs, the step run eagerly on them), so the body runs, and must pass, without a GPU."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    args = competitive.get_args_parser().parse_args(["--models", "resnet20", "resnet20"])
    rt = utils.Runtime(device, amp_dtype, True, cuda_graphs=on_gpu)
    stats_tol, param_tol = (1e-3, 1e-4) if amp_dtype is None else (2e-2, 1e-2)
    lr = 0.1 if optimizer == "sgd" else 1e-3
    size = 32 if on_gpu else 16  # the CPU's bfloat16 convolutions are slow; the wrapper's work is the same

    def group():
        torch.manual_seed(0)
        nets = [models.create_model("resnet20", num_classes=10, img_size=size, in_chans=3).to(device, memory_format=torch.channels_last)
                for _ in range(2)]
        optimizers = [utils.build_optimizer(net, optimizer, lr, 5e-4, fused=True, capturable=True) for net in nets]
        return nets, optimizers

    scaler = torch.amp.GradScaler(device.type, enabled=False)
    (eager_nets, eager_opts), (graph_nets, graph_opts) = group(), group()
    eager = functools.partial(competitive.competitive_step, step_run(eager_nets, eager_opts, scaler, args, rt))
    captured = capture.CapturedStep(functools.partial(competitive.competitive_step,
                                                      step_run(graph_nets, graph_opts, scaler, args, rt)),
                                    warmup=2, capture=on_gpu)
    generator = torch.Generator(device).manual_seed(0)
    for step in range(8):
        for opt in eager_opts + graph_opts:
            utils.set_lr(opt, lr / (1 + step))
        images = torch.randn(16, 3, size, size, device=device, generator=generator)
        labels = torch.randint(0, 10, (16,), device=device, generator=generator)
        perm = torch.randperm(16, device=device, generator=generator)
        lams = torch.tensor([1.0, 0.3 if step == 5 else 1.0], device=device)
        mixed = 0.3 * images + 0.7 * images[perm] if step == 5 else images
        expected = eager([images, mixed], labels, labels[perm], lams)
        got = captured([images, mixed], labels, labels[perm], lams)  # a replay overwrites its statistics: compare now
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=stats_tol, atol=stats_tol, msg=f"step {step}: {name}")
        assert torch.equal(got["leader_share"], expected["leader_share"]), step  # the same leader every step
    assert (captured.graph is not None) == on_gpu and captured.static_inputs is not None
    for a, b in zip(eager_nets, graph_nets):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=param_tol)


def test_a_batch_shared_by_the_networks_is_converted_once(monkeypatch):
    """The group steps lay out each distinct batch once (utils.to_inputs), not once per network, and
    train exactly as when every network gets its own converted copy."""
    args = competitive.get_args_parser().parse_args(["--models", "resnet20", "resnet20", "resnet20"])
    rt = utils.Runtime(torch.device("cpu"), None, True)
    images, other = torch.randn(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    converted = []
    to_input = utils.to_input
    monkeypatch.setattr(utils, "to_input", lambda x, rt: converted.append(x) or to_input(x, rt))
    inputs = utils.to_inputs([images, images, other], rt)
    assert [x is y for x, y in zip(converted, [images, other])] == [True, True] and inputs[0] is inputs[1]
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
    monkeypatch.undo()

    def trained(batches):
        torch.manual_seed(3)
        nets = [models.create_model("resnet20", num_classes=10, img_size=16, in_chans=3).to(memory_format=torch.channels_last)
                for _ in range(3)]
        optimizers = [utils.build_optimizer(net, "sgd", 0.1, 5e-4) for net in nets]
        stats = competitive.competitive_step(step_run(nets, optimizers, torch.amp.GradScaler("cpu", enabled=False), args, rt),
                                             batches, labels, labels, torch.ones(3))
        return stats, [p.detach().clone() for net in nets for p in net.parameters()]

    (shared, shared_weights), (copies, copied_weights) = trained([images, images, other]), trained(
        [to_input(images.clone(), rt), to_input(images.clone(), rt), to_input(other, rt)])
    assert all(torch.equal(shared[name], copies[name]) for name in shared)
    assert all(torch.equal(a, b) for a, b in zip(shared_weights, copied_weights))


def test_benchmark_runs_on_the_cpu(tmp_path):
    from benchmarks import bench
    args = bench.get_args_parser().parse_args(
        ["--models", "resnet20", "resnet20", "--batch-size", "8", "--img-size", "16", "--device", "cpu",
         "--variants", "reference", "default", "--amp", "none", "bf16", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--workers", "0", "--json", str(tmp_path / "bench.json")])
    runs = bench.main(args)
    results = {(r["variant"], r["precision"]): r for r in runs[0]["results"]}
    assert list(results) == [("reference", "fp32"), ("default", "fp32"), ("default", "bf16")]  # one reference, fp32
    assert all(r["images_per_s"] > 0 for r in results.values())
    assert results["reference", "fp32"]["vs_reference"] == 1.0
    assert (tmp_path / "bench.json").exists()


def test_benchmark_keeps_going_past_a_failing_variant(tmp_path, monkeypatch, capsys):
    """A variant that raises is reported with its error; the others' figures still reach the JSON."""
    import json

    from benchmarks import bench

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed\nsecond line")

    monkeypatch.setattr(bench, "repository_steps", broken)
    args = bench.get_args_parser().parse_args(
        ["--models", "resnet20", "resnet20", "--batch-size", "4", "--img-size", "8", "--device", "cpu",
         "--variants", "reference", "default", "--steps", "1", "--warmup", "0", "--repeats", "1", "--workers", "0",
         "--json", str(tmp_path / "bench.json")])
    bench.main(args)
    saved = json.loads((tmp_path / "bench.json").read_text())
    reference, default = saved["runs"][0]["results"]
    assert reference["images_per_s"] > 0
    assert default == {"variant": "default", "amp": "auto", "error": "RuntimeError: capture failed"}
    assert "default    auto      failed: RuntimeError: capture failed" in capsys.readouterr().out


def test_benchmark_suite_compiles_each_configuration_afresh_with_static_shapes(monkeypatch):
    """--suite resets Dynamo before each configuration and compiles with dynamic=False, so the 224-px
    figure is not a dynamic-shape recompilation of the 32-px graphs."""
    from benchmarks import bench
    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    monkeypatch.setattr(bench, "time_variant",
                        lambda name, args, device, *precision: events.append((len(args.models), args.img_size)) or
                        {"variant": name, "amp": "auto", "images_per_s": 1.0, "warmup_s": 0.0, "peak_mem_mib": None})
    bench.main(bench.get_args_parser().parse_args(["--suite", "--device", "cpu", "--variants", "fast"]))
    assert events == ["reset", (2, 32), "reset", (4, 32), "reset", (2, 224)]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: compiled.append(kwargs) or net)
    args = bench.get_args_parser().parse_args(["--models", "resnet20", "resnet20", "--batch-size", "4",
                                               "--img-size", "8", "--device", "cpu"])
    bench.repository_steps(args, torch.device("cpu"), compile_nets=True, amp="none")
    assert compiled == [{"dynamic": False}] * 2


def test_benchmark_reference_uses_the_same_optimizer_family(made_optimizers):
    """The reference loop steps SGD with Nesterov momentum like default/fast, not AdamW."""
    from benchmarks import bench
    args = bench.get_args_parser().parse_args(["--models", "resnet20", "resnet20", "--batch-size", "4",
                                               "--img-size", "8", "--device", "cpu", "--workers", "0"])
    bench.reference_steps(args, torch.device("cpu"))
    assert [name for name, _ in made_optimizers] == ["SGD", "SGD"]
    for _, kwargs in made_optimizers:
        assert kwargs["momentum"] == 0.9 and kwargs["nesterov"] and kwargs["lr"] == pytest.approx(0.1 * 4 / 128)


def test_benchmark_refuses_a_missing_device(capsys):
    from benchmarks import bench
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(bench.main, bench.get_args_parser(), ["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --device")


def test_transformer_recipe_exempts_embeddings_from_weight_decay():
    net = models.create_model("vit_tiny", num_classes=3, img_size=16, in_chans=3)
    optimizer = utils.build_optimizer(net, "adamw", 1e-3, 0.05, decay_norm_and_bias=False)
    decayed, exempt = optimizer.param_groups
    names = {id(p): name for name, p in net.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token"} <= exempt_names
    assert all(p.ndim > 1 for p in decayed["params"]) and "patch_embed.proj.weight" not in exempt_names
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(net.parameters()))
