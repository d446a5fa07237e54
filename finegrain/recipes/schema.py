"""The common recipe schema: the sections every training command reads, and their valid ranges.

Every key a recipe may hold is a field of these dataclasses, so a typo or a wrong type is caught
before a long run starts (see `finegrain.recipes.validation`). Types say what a value is;
`Recipe.problems` says which values of the right type still make no sense. Tasks with more
sections (retrieval, backbone pretraining) subclass `Recipe` and extend `problems`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

# Bounds that keep a value of the right type from allocating without limit (a 10^6-pixel crop,
# a network millions of channels wide). Generous: the paper's largest image side is 448.
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**31  # numpy's seeds stop at 2**32, and the loaders multiply the seed
MAX_PROCESSES = 1024  # loader workers or threads: a typo must not fork thousands of processes
# model.overrides keys the registered families share, with bounds far beyond any real network.
# The model's own config checks the rest when it is built; these fail before a run starts.
MODEL_OVERRIDE_BOUNDS = {"base_width": (1, 1024), "embedding_size": (0, 65536), "se_reduction": (1, 1024),
                         "sk_reduction": (1, 1024), "drop_block_size": (1, 64)}
MAX_BLOCKS_PER_STAGE = 100  # ResNet-152 has 36
PAPER_ROW = re.compile(r"[0-9]{1,2}:[A-Za-z0-9.=+-]{1,16}")  # table number, then the row as printed


@dataclass
class ModelConfig:
    """The backbone: a registered name (or "timm/NAME"), its warm-start weights, its overrides."""

    name: str = "assemble_resnet50"
    weights: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # The release does not restore BN moving statistics when fine-tuning (re-estimated, see the
    # BN momentum rule); set False to keep them.
    reset_bn_stats: bool = True
    # The recipe fine-tunes pretrained weights (the paper's FGVC and retrieval recipes): starting
    # without them is a mistake worth a loud warning. The demos start from scratch on purpose.
    expects_weights: bool = False


@dataclass
class DataConfig:
    """Which data set, where, and the image sizes (null: the backbone's own preprocessing)."""

    kind: str = "folder"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = None
    eval_resize: int | None = None
    eval_crop: int | None = None
    # Smallest area fraction of the random-resized crop (the paper: 0.05). Tiny data sets
    # trained from scratch need milder crops to keep shape and size cues.
    crop_min_area: float = 0.05
    # false: train on the eval transform (no random augmentation), e.g. to compare runs exactly.
    augment: bool = True


@dataclass
class OptimConfig:
    """SGD with momentum; weight decay applies to every weight except BN gamma/beta."""

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-3
    # When set, the lr is scaled linearly: lr * batch_size / lr_reference_batch (He et al.),
    # so a recipe written for batch 1024 keeps its dynamics at a smaller batch. The release
    # itself does not scale (null).
    lr_reference_batch: int | None = None


@dataclass
class ScheduleConfig:
    """Per-step linear warmup from 0, then cosine decay to `final_lr`."""

    warmup_epochs: float = 5.0
    final_lr: float = 0.0


@dataclass
class MixupConfig:
    """Type 1: two independently loaded batches mixed (the paper's choice); type 2: the release's
    one-batch variant (its halves mixed pairwise, and with the other half reversed); null: off.
    One lambda per sample from Beta(alpha, alpha)."""

    type: Literal[1, 2] | None = None
    alpha: float = 0.2


@dataclass
class DropBlockConfig:
    """DropBlock keep_prob, decayed linearly over all training steps from `start` to `end`."""

    start: float = 1.0
    end: float = 1.0


@dataclass
class KDConfig:
    """Knowledge distillation from offline teacher logits (a file); null logits: off."""

    logits: str | None = None
    temperature: float = 1.0


@dataclass
class RegularizationConfig:
    label_smoothing: float = 0.0
    mixup: MixupConfig = field(default_factory=MixupConfig)
    dropblock: DropBlockConfig = field(default_factory=DropBlockConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    # "imagenet" / "cifar10": torchvision's policies and magnitudes; "release_good" (the release's
    # 95-sub-policy CIFAR policy, its FGVC choice) and "release_imagenet": the release's policies
    # with their TF magnitudes (finegrain.data.autoaugment_release).
    autoaugment: Literal["imagenet", "cifar10", "release_good", "release_imagenet"] | None = None


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 256
    eval_batch_size: int | None = None
    workers: int = 4
    # CPU intra-op threads while training (null: torch's default, one per core). Small networks
    # gain little from more, and threads that wait for each other on a busy machine can make a
    # run many times slower; the GPU path ignores it.
    threads: int | None = None
    # auto: bf16 on CUDA when supported, else fp16 with a grad scaler; fp32 on CPU (which
    # "bf16" turns into bf16 autocast on CPUs with native bf16).
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    seed: int = 0
    # BN momentum max(1 - 10/s, 0.9) in TF terms, s = steps per epoch (Appendix B).
    bn_momentum_rule: bool = False
    # A fixed BN momentum in TF terms (the share of the old running average kept: the release
    # trains its backbones with 0.997); null: PyTorch's default 0.1 (TF 0.9) unless the rule is on.
    bn_momentum: float | None = None
    # Under torchrun: batch_size is the GLOBAL batch, split evenly across processes; each rank's
    # share is split again into accumulate_steps micro-batches (reach batch 1024 on fewer GPUs).
    accumulate_steps: int = 1
    # The batch BN normalises over while training (finegrain.train.batch_norm): per_process (each
    # process's micro-batch), sync (all processes' micro-batches; GPUs) or virtual (groups of
    # bn_virtual_size images, the same on any number of processes, with or without accumulation).
    bn_batch: Literal["per_process", "sync", "virtual"] = "per_process"
    bn_virtual_size: int | None = None
    freeze_bn: bool = False  # BN layers stay in eval mode while training (running statistics fixed)


@dataclass
class EvalConfig:
    """Which split picks best.safetensors. "val": a validation part held out of the training data
    (the data set's official one for Flowers-102 and FGVC-Aircraft, else a stratified `val_fraction`
    drawn with `val_seed`; whole classes for zero-shot retrieval), the test split evaluated once at
    the end; "test": the authors' protocol (every "best" figure is then optimistic)."""

    select_on: Literal["val", "test"] = "val"
    val_fraction: float = 0.1
    val_seed: int = 0


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (timm's ModelEmaV3), kept in FP32, evaluated
    each epoch beside the raw weights and saved as ema.safetensors. `warmup`: the decay grows as
    1 - (1 + step)^(-2/3) up to `decay`, so early averages do not drag in the random start."""

    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = True


@dataclass
class OutputConfig:
    """Where the run directory goes (null: runs/<recipe name>)."""

    dir: str | None = None


# (broken, dotted key, what the value must be); the first broken rule is reported.
Rule = tuple[bool, str, str]


@dataclass
class Recipe:
    name: str = "unnamed"
    description: str = ""
    # The paper's rows this recipe trains, "TABLE:ROW" ("7:E3", "10:F13"): `finegrain recipes --table 7`.
    paper_rows: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def effective_lr(self) -> float:
        """The peak lr after the optional linear batch-size scaling."""
        if self.optim.lr_reference_batch is None:
            return self.optim.lr
        return self.optim.lr * self.train.batch_size / self.optim.lr_reference_batch

    def rules(self) -> list[Rule]:
        """Values of the right type that still make no sense (types and finiteness are checked
        while the recipe is built). Subclasses append the rules of their own sections."""
        data, optim, train, reg = self.data, self.optim, self.train, self.regularization
        sizes = [(f"data.{key}", getattr(data, key)) for key in ("train_size", "eval_resize", "eval_crop")]
        return [
            (optim.lr <= 0, "optim.lr", "positive"),
            (not 0.0 <= optim.momentum < 1.0, "optim.momentum", "in [0, 1)"),
            (optim.weight_decay < 0, "optim.weight_decay", "0 or more"),
            (optim.lr_reference_batch is not None and optim.lr_reference_batch < 1,
             "optim.lr_reference_batch", "at least 1, or null"),
            (self.schedule.warmup_epochs < 0, "schedule.warmup_epochs", "0 or more"),
            (self.schedule.final_lr < 0, "schedule.final_lr", "0 or more"),
            *((size is not None and not 0 < size <= MAX_IMAGE_SIDE, key, f"in [1, {MAX_IMAGE_SIDE}] pixels, or null")
              for key, size in sizes),
            (not 0.0 < data.crop_min_area <= 1.0, "data.crop_min_area", "in (0, 1]"),
            (train.epochs < 1, "train.epochs", "at least 1"),
            (train.batch_size < 1, "train.batch_size", "at least 1"),
            (train.eval_batch_size is not None and train.eval_batch_size < 1,
             "train.eval_batch_size", "at least 1, or null"),
            (not 0 <= train.workers <= MAX_PROCESSES, "train.workers", f"in [0, {MAX_PROCESSES}]"),
            (train.threads is not None and not 1 <= train.threads <= MAX_PROCESSES,
             "train.threads", f"in [1, {MAX_PROCESSES}], or null"),
            (train.accumulate_steps < 1, "train.accumulate_steps", "1 or more"),
            (train.bn_momentum is not None and (train.bn_momentum_rule or not 0.0 <= train.bn_momentum < 1.0),
             "train.bn_momentum", "in [0, 1) in TF terms (the release: 0.997), or null when train.bn_momentum_rule is on"),
            ((train.bn_batch == "virtual") != (train.bn_virtual_size is not None) or
             (train.bn_virtual_size is not None and train.bn_virtual_size < 2),
             "train.bn_virtual_size", "2 or more with train.bn_batch=virtual, else null"),
            (not 0 <= train.seed < MAX_SEED, "train.seed", f"in [0, 2**{MAX_SEED.bit_length() - 1})"),
            (not 0.0 <= reg.label_smoothing < 1.0, "regularization.label_smoothing", "in [0, 1)"),
            (reg.mixup.alpha <= 0, "regularization.mixup.alpha", "positive"),
            (not 0.0 < reg.dropblock.start <= 1.0, "regularization.dropblock.start", "in (0, 1]"),
            (not 0.0 < reg.dropblock.end <= 1.0, "regularization.dropblock.end", "in (0, 1]"),
            (reg.kd.temperature <= 0, "regularization.kd.temperature", "positive"),
            (not 0.0 < self.eval.val_fraction < 1.0, "eval.val_fraction", "in (0, 1)"),
            (not 0 <= self.eval.val_seed < MAX_SEED, "eval.val_seed", f"in [0, 2**{MAX_SEED.bit_length() - 1})"),
            (not 0.0 <= self.ema.decay < 1.0, "ema.decay", "in [0, 1)"),
            *((not PAPER_ROW.fullmatch(row), "paper_rows", "a list of TABLE:ROW names such as 7:E3")
              for row in self.paper_rows),
            *model_override_rules(self.model.overrides),
        ]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_override_rules(overrides: dict[str, Any]) -> list[Rule]:
    """Bounds on the architecture overrides every family shares (base_width: 0 or
    layers: [3, 4, 200000, 3] would fail deep inside the model, or allocate without limit)."""
    rules: list[Rule] = []
    for key, (low, high) in MODEL_OVERRIDE_BOUNDS.items():
        if key in overrides:
            value = overrides[key]
            nullable = key == "se_reduction"
            rules.append((not (nullable and value is None) and not (_is_int(value) and low <= value <= high),
                          f"model.overrides.{key}", f"an integer in [{low}, {high}]" + (", or null" if nullable else "")))
    if "layers" in overrides:
        layers = overrides["layers"]
        rules.append((not isinstance(layers, list) or not layers
                      or not all(_is_int(n) and 1 <= n <= MAX_BLOCKS_PER_STAGE for n in layers),
                      "model.overrides.layers", f"a list of block counts per stage, each in [1, {MAX_BLOCKS_PER_STAGE}]"))
    return rules
