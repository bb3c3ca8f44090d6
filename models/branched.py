"""Branched networks for the online-distillation baselines ONE, OKDDip and PCL.

One registered CIFAR ResNet or Wide ResNet is cut in two: the stem and stages 1-2 are a shared
trunk; each of m branches is its own copy of stage 3 (for a WRN with the final BN-ReLU), global
average pooling and a classifier. This is the layout of ONE (Lan, Zhu & Gong, NeurIPS 2018,
arXiv 1806.04606; github.com/Lan1991Xu/ONE_NeurIPS2018 @54afde30, models/cifar/resnet.py)
and of OKDDip (Chen et al., AAAI 2020, arXiv 1912.00350; github.com/DefangChen/OKDDip
@c6a05de8, models/model_cifar/resnet_GL.py). Both official codes use projection (1x1 conv + BN)
shortcuts; the branches here keep the base network of models/resnet.py (option-A shortcuts), so a
branch is exactly the registered network and its weights load into `models.create_model(base)`.

PCL (Wu & Gong, AAAI 2021, arXiv 2006.04147) uses the same layout (its unofficial reimplementation,
github.com/shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation @6afb473,
models/resnet.py: conv1 and stages 1-2 shared, a peer = stage 3 + pooling + FC).

Optional parts:
- peer ensemble (PCL): a classifier Linear(m * C3, classes) on the peers' concatenated pooled features,
  the peer-ensemble teacher; TemporalMeanNet adds PCL's temporal mean network.
- gate (ONE): softmax(ReLU(BN1d(Linear(C2, m)(pool(stage-2 output))))), one weight per sample
  and branch; the gated ensemble of the branches' logits is ONE's teacher (losses.gated_ensemble).
- peer attention (OKDDip): query and key projections Linear(C3, C3 // 8, bias=False) shared by the
  peers, applied to each peer's pooled stage-3 features (losses.peer_attention_weights).

`forward(x)` returns the deployed branch's logits only (the repository's model contract);
`forward(x, all_branches=True)` every branch's logits, the gate, the pooled features and their
projections, for the training scripts (x may also be a list: one view of the batch per branch).
Registered names: `one:BASE:M` (gate, branch 0 deployed), `okddip:BASE:M` (peer attention, the last
branch, the leader, deployed) and `pcl:BASE:M` (peer ensemble and temporal mean, the mean's peer 0
deployed); see `resolve_branched`.
"""
import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

# The registered networks whose layers are one flat `features` Sequential (stem, three stages of
# blocks, for a WRN a final BN-ReLU) followed by `fc`, which is what the cut below relies on.
BRANCHABLE = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
              "wrn_16_8", "wrn_28_10", "wrn_40_2")


class BranchOutputs(NamedTuple):
    """Every branch's output: logits (m, B, C), gate (B, m) or None, pooled stage-3 features (m, B, C3),
    with peer attention their queries and keys (m, B, C3 // 8), with a peer ensemble its logits (B, C)
    (else None)."""
    logits: torch.Tensor
    gate: Optional[torch.Tensor]
    features: torch.Tensor
    queries: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    ensemble: Optional[torch.Tensor] = None


def stage3_start(features):
    """Index in a base network's `features` of stage 3's first block: the second block of stride 2."""
    downsampling = [index for index, module in enumerate(features)
                    if hasattr(module, "conv1") and module.conv1.stride[0] == 2]
    if len(downsampling) != 2:
        raise ValueError(f"expected two stride-2 blocks (the first of stages 2 and 3), found {len(downsampling)}")
    return downsampling[1]


class BranchedNet(nn.Module):
    """A shared trunk (stem + stages 1-2) and m branches (stage 3 + pool + classifier).

    `networks` are m base networks of one architecture, each freshly initialised: the trunk is
    taken from the first, branch i's stage 3 and classifier from network i, so each branch starts
    as an independent initialisation of the base network. `deployed` is the branch that `forward`
    runs and `deployed_state_dict` exports: branch 0 for ONE (its "branch 1"); the last branch,
    the group leader, for OKDDip (peers 0..m-2, leader m-1, as in the official resnet_GL.py).
    `create_branched` also sets `base`, the registry name of the base network.
    """

    def __init__(self, networks, *, gate=False, peer_attention=False, peer_ensemble=False, deployed=0):
        super().__init__()
        branches = len(networks)
        if not -branches <= deployed < branches:
            raise ValueError(f"deployed must name one of the {branches} branches, got {deployed}")
        self.deployed = deployed % branches
        self.stage3_start = stage3_start(networks[0].features)
        self.trunk = nn.Sequential(*networks[0].features[:self.stage3_start])
        self.stages = nn.ModuleList(nn.Sequential(*network.features[self.stage3_start:]) for network in networks)
        self.heads = nn.ModuleList(network.fc for network in networks)
        trunk_channels = networks[0].features[self.stage3_start].conv1.in_channels    # C2
        feature_channels = networks[0].fc.in_features                                # C3
        # PyTorch's default Linear/BatchNorm1d initialisation, as in both official codes (their
        # init loops touch only Conv2d and BatchNorm2d).
        self.gate = (nn.Sequential(nn.Linear(trunk_channels, branches), nn.BatchNorm1d(branches), nn.ReLU())
                     if gate else None)
        self.query = self.key = None
        if peer_attention:
            self.query = nn.Linear(feature_channels, feature_channels // 8, bias=False)
            self.key = nn.Linear(feature_channels, feature_channels // 8, bias=False)
        self.ensemble_head = nn.Linear(branches * feature_channels, networks[0].fc.out_features) if peer_ensemble else None

    @property
    def branches(self):
        """Number of branches m."""
        return len(self.stages)

    def forward(self, x, all_branches=False):
        """The deployed branch's logits (B, num_classes), the other branches not run; with
        all_branches, forward_branches(x) (through forward, so that DDP sees the call)."""
        if all_branches:
            return self.forward_branches(x)
        features = self.stages[self.deployed](self.trunk(x)).mean(dim=(2, 3))
        return self.heads[self.deployed](features)

    def forward_branches(self, x):
        """Every branch's logits, the gate (None without one) and the pooled stage-3 features (and the
        peer projections and peer ensemble of a network that has them). x: the batch, or a list of one
        view of it per branch, which the trunk then runs once per view (PCL's multi-view peers)."""
        if isinstance(x, (list, tuple)):
            if len(x) != self.branches:
                raise ValueError(f"forward_branches: {len(x)} views for {self.branches} branches")
            shared = [self.trunk(view) for view in x]
        else:
            shared = [self.trunk(x)] * self.branches
        gate = None
        if self.gate is not None:
            # ONE's gate reads the globally pooled trunk (stage-2) output; softmax over branches.
            gate = F.softmax(self.gate(shared[0].mean(dim=(2, 3))), dim=1)
        features = torch.stack([stage(trunk).mean(dim=(2, 3)) for stage, trunk in zip(self.stages, shared)])
        logits = torch.stack([head(branch) for head, branch in zip(self.heads, features)])
        queries, keys = self.peer_projections(features) if self.query is not None else (None, None)
        ensemble = None
        if self.ensemble_head is not None:  # PCL's peer-ensemble teacher: a classifier on the concatenated features
            ensemble = self.ensemble_head(features.permute(1, 0, 2).flatten(1))
        return BranchOutputs(logits, gate, features, queries, keys, ensemble)

    def classifier_names(self):
        """The modules that output class logits: every branch's classifier, and the peer ensemble's (not the
        gate, nor the attention projections)."""
        return [f"heads.{i}" for i in range(self.branches)] + (["ensemble_head"] if self.ensemble_head is not None else [])

    def peer_projections(self, features):
        """OKDDip's queries and keys (..., C3 // 8) of pooled features (..., C3), shared by all peers."""
        if self.query is None:
            raise ValueError("peer_projections needs a network built with peer_attention=True")
        return self.query(features), self.key(features)

    def deployed_state_dict(self):
        """The trunk and the deployed branch under the base network's names (`features.N.*`, `fc.*`),
        loadable with strict=True into `models.create_model(base, ...)`."""
        state = {f"features.{key}": value for key, value in self.trunk.state_dict().items()}
        for key, value in self.stages[self.deployed].state_dict().items():
            index, rest = key.split(".", 1)
            state[f"features.{int(index) + self.stage3_start}.{rest}"] = value
        state.update({f"fc.{key}": value for key, value in self.heads[self.deployed].state_dict().items()})
        return state


class TemporalMeanNet(nn.Module):
    """PCL's network: `live`, a branched network with a peer ensemble, which trains, and `mean`, its
    temporal mean (a copy whose parameters follow the live ones as an exponential moving average, updated
    by the training step, ema.blend; its BatchNorm statistics are its own, from its own train-mode forwards,
    as in the PCL reimplementation). `forward(x)` is the deployed network, the mean's peer 0 (the PCL
    reimplementation deploys the mean network's first peer); `forward(x, all_branches=True)` the live
    network's outputs; the mean is never trained by a gradient."""

    def __init__(self, live):
        super().__init__()
        self.live = live
        self.mean = copy.deepcopy(live).requires_grad_(False)
        self.base = getattr(live, "base", None)

    @property
    def branches(self):
        """Number of peers m."""
        return self.live.branches

    def forward(self, x, all_branches=False):
        """The mean's deployed peer's logits; with all_branches, the live network's BranchOutputs."""
        return self.live(x, all_branches=True) if all_branches else self.mean(x)

    def classifier_names(self):
        """The trained network's classifiers and its temporal mean's."""
        return [f"{part}.{name}" for part in ("live", "mean") for name in self.live.classifier_names()]

    def deployed_state_dict(self):
        """The mean network's deployed peer under the base network's names (BranchedNet.deployed_state_dict)."""
        return self.mean.deployed_state_dict()


def create_branched(base, *, branches, num_classes, img_size, in_chans, gate=False,
                    peer_attention=False, peer_ensemble=False, deployed=0):
    """A BranchedNet of `branches` branches on the registered network `base` (or an alias)."""
    from . import create_model, is_zoo_name, resolve_name   # here: models/__init__.py may import this file

    key = None if is_zoo_name(base) else resolve_name(base)
    if key not in BRANCHABLE:
        raise ValueError(f"create_branched: '{base}' cannot branch; choose from: {', '.join(BRANCHABLE)}")
    if not isinstance(branches, int) or branches < 2:
        raise ValueError(f"create_branched: branches must be an integer >= 2, got {branches}")
    networks = [create_model(key, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
                for _ in range(branches)]
    model = BranchedNet(networks, gate=gate, peer_attention=peer_attention, peer_ensemble=peer_ensemble,
                        deployed=deployed)
    model.base = key
    return model


# Registered branched models by name, METHOD:BASE:M (models.create_model builds them).
METHODS = {"one": dict(gate=True, deployed=0), "okddip": dict(peer_attention=True, deployed=-1),
           "pcl": dict(peer_ensemble=True, deployed=0)}


def is_branched_name(name):
    """True for a name of the form METHOD:BASE:M, METHOD one of METHODS (one, okddip, pcl)."""
    return isinstance(name, str) and name.split(":", 1)[0] in METHODS


def resolve_branched(name):
    """The canonical METHOD:BASE:M of a branched name (BASE resolved); ValueError in one line otherwise."""
    from . import resolve_name   # here: models/__init__.py imports this file
    parts = name.split(":")
    if len(parts) != 3 or not parts[2].isdecimal():
        raise ValueError(f"'{name}': a branched model is named {parts[0]}:BASE:M (M branches), e.g. {parts[0]}:resnet32:3")
    base = resolve_name(parts[1]) if ":" not in parts[1] else parts[1]
    if base not in BRANCHABLE:
        raise ValueError(f"'{name}': {parts[1]} cannot branch; choose from: {', '.join(BRANCHABLE)}")
    if int(parts[2]) < 2:
        raise ValueError(f"'{name}': branches must be an integer >= 2, got {parts[2]}")
    return f"{parts[0]}:{base}:{int(parts[2])}"


def branch_members(name):
    """The rows a branched network METHOD:BASE:M reports, [(label, BASE), ...], the deployed branch first:
    ONE's branch0..., OKDDip's leader, then its peers."""
    method, base, branches = resolve_branched(name).split(":")
    if METHODS[method].get("deployed", 0) == -1:  # the last branch is the leader
        return [(f"leader_{base}", base)] + [(f"peer{i}_{base}", base) for i in range(int(branches) - 1)]
    if method == "pcl":  # the temporal mean network's peers, the deployed one first
        return [(f"peer{i}_{base}", base) for i in range(int(branches))]
    return [(f"branch{i}_{base}", base) for i in range(int(branches))]


def create_branched_by_name(name, *, num_classes, img_size, in_chans):
    """The branched model METHOD:BASE:M (see METHODS)."""
    method, base, branches = resolve_branched(name).split(":")
    model = create_branched(base, branches=int(branches), num_classes=num_classes, img_size=img_size,
                            in_chans=in_chans, **METHODS[method])
    return TemporalMeanNet(model) if method == "pcl" else model
