"""Training recipes: YAML files that mirror the paper's tables, validated against a typed schema.

A recipe is plain YAML; every key it may hold is a field of the dataclasses below, so a typo or a
wrong type is caught before a long run starts, with a message naming the key, the expected type
and the valid keys. Any value can be overridden from the command line with `--set a.b=value`
(the value is parsed as YAML, so `--set optim.lr=0.02`, `--set data.root=null` and
`--set model.overrides={base_width: 8}` all work).

Other tasks (retrieval, backbone pretraining) extend the schema by subclassing `Recipe` with
extra sections and passing their class to `load_recipe(..., schema=...)`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from finegrain.errors import FinegrainError

RECIPES_DIR = Path(__file__).resolve().parent  # the YAML files ship inside the package
# The schema of each recipe group (recipes/<group>/*.yaml), imported on first use; groups not
# listed use `Recipe`.
GROUP_SCHEMAS: dict[str, str] = {"retrieval": "finegrain.train.retrieval:RetrievalRecipe",
                                 "backbone": "finegrain.train.backbone:BackboneRecipe"}


@dataclass
class ModelConfig:
    """The backbone: a registered name (or "timm/NAME"), its warm-start weights, its overrides."""

    name: str = "assemble_resnet50"
    weights: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # The release does not restore BN moving statistics when fine-tuning (re-estimated, see the
    # BN momentum rule); set False to keep them.
    reset_bn_stats: bool = True


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
    """Type 1: two independently loaded batches mixed (the paper's choice); type 2: a batch with
    a shuffled copy of itself; null: off. One lambda per sample from Beta(alpha, alpha)."""

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
    autoaugment: Literal["imagenet", "cifar10"] | None = None


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
    # Under torchrun: batch_size is the GLOBAL batch, split evenly across processes; each rank's
    # share is split again into accumulate_steps micro-batches (reach batch 1024 on fewer GPUs).
    accumulate_steps: int = 1
    sync_bn: bool = False  # SyncBatchNorm across processes (GPUs only)
    freeze_bn: bool = False  # BN layers stay in eval mode while training (running statistics fixed)


@dataclass
class OutputConfig:
    """Where the run directory goes (null: runs/<recipe name>)."""

    dir: str | None = None


@dataclass
class Recipe:
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def effective_lr(self) -> float:
        """The peak lr after the optional linear batch-size scaling."""
        if self.optim.lr_reference_batch is None:
            return self.optim.lr
        return self.optim.lr * self.train.batch_size / self.optim.lr_reference_batch


R = TypeVar("R", bound=Recipe)


# ---------------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except FinegrainError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".")
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise FinegrainError(f"Recipe key '{key}' must be {_type_name(tp)}, got {type(value).__name__} "
                         f"{value!r}. Fix the value in the recipe or in --set.")


def _build(cls: type[R], raw: dict[str, Any], prefix: str = "") -> R:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise FinegrainError(f"Unknown recipe key '{prefix}{unknown[0]}'. Valid keys"
                             f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}.")
    values = {k: _convert(hints[k], v, prefix + k) for k, v in raw.items()}
    return cls(**values)


def recipe_from_dict(raw: dict[str, Any], schema: type[R] = Recipe) -> R:  # type: ignore[assignment]
    """Validate a plain mapping into a recipe; missing keys take the schema's defaults."""
    if not isinstance(raw, dict):
        raise FinegrainError(f"A recipe must be a YAML mapping, got {type(raw).__name__}. "
                             "Write it as `key: value` lines.")
    recipe = _build(schema, raw)
    _check_ranges(recipe)
    return recipe


def _check_ranges(recipe: Recipe) -> None:
    """Values of the right type that still make no sense."""
    problems = []
    if recipe.train.epochs < 1:
        problems.append(("train.epochs", "at least 1"))
    if recipe.train.batch_size < 1:
        problems.append(("train.batch_size", "at least 1"))
    if recipe.train.workers < 0:
        problems.append(("train.workers", "0 or more"))
    if recipe.train.accumulate_steps < 1:
        problems.append(("train.accumulate_steps", "1 or more"))
    if recipe.train.threads is not None and recipe.train.threads < 1:
        problems.append(("train.threads", "at least 1, or null"))
    if recipe.optim.lr <= 0:
        problems.append(("optim.lr", "positive"))
    if not 0.0 < recipe.data.crop_min_area <= 1.0:
        problems.append(("data.crop_min_area", "in (0, 1]"))
    if not 0.0 <= recipe.regularization.label_smoothing < 1.0:
        problems.append(("regularization.label_smoothing", "in [0, 1)"))
    if recipe.regularization.mixup.type is not None and recipe.regularization.mixup.alpha <= 0:
        problems.append(("regularization.mixup.alpha", "positive when mixup.type is set"))
    for end in ("start", "end"):
        if not 0.0 < getattr(recipe.regularization.dropblock, end) <= 1.0:
            problems.append((f"regularization.dropblock.{end}", "in (0, 1]"))
    if recipe.regularization.kd.temperature <= 0:
        problems.append(("regularization.kd.temperature", "positive"))
    if problems:
        key, wanted = problems[0]
        raise FinegrainError(f"Recipe key '{key}' must be {wanted}. Fix the value in the recipe or in --set.")


# ----------------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a raw recipe mapping (values parsed as YAML); returns a copy.

    Validation happens afterwards, so a wrong key or type is reported like one in the file.
    """
    result = copy.deepcopy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise FinegrainError(f"Cannot parse --set '{assignment}'. Write it as KEY=VALUE with a "
                                 "dotted key, e.g. --set optim.lr=0.02.")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise FinegrainError(f"The value of --set '{assignment}' is not valid YAML ({exc}). "
                                 "Quote it, e.g. --set data.root='\"my dir\"'.") from exc
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FinegrainError(f"--set '{key}': '{'.'.join(parts[:depth + 1])}' holds a value, "
                                     "not a section. Set it directly.")
            node = child
        node[parts[-1]] = value
    return result


# ------------------------------------------------------------------------------------- finding
def list_recipes(root: Path = RECIPES_DIR) -> list[str]:
    """Every recipe as its short path name, e.g. "fgvc/food101" (files starting "_" excluded)."""
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not p.name.startswith("_"))


def find_recipe(name: str, group: str | None = None, root: Path = RECIPES_DIR) -> Path:
    """Resolve "food101", "fgvc/food101" or a path to a YAML file.

    A bare name is looked up in `group` first (the command's own group, so `cars196` means the
    FGVC recipe for `finegrain fgvc`), then anywhere; an ambiguous name lists the candidates.
    """
    as_path = Path(name)
    if as_path.suffix in {".yaml", ".yml"}:
        if not as_path.is_file():
            raise FinegrainError(f"Recipe file {as_path} does not exist. Check the path.")
        return as_path
    known = list_recipes(root)
    stem = name.removesuffix(".yaml")
    if stem in known:
        return root / f"{stem}.yaml"
    if group and f"{group}/{stem}" in known:
        return root / group / f"{stem}.yaml"
    matches = [k for k in known if k.rsplit("/", 1)[-1] == stem]
    if len(matches) == 1:
        return root / f"{matches[0]}.yaml"
    if matches:
        raise FinegrainError(f"Recipe name '{name}' is ambiguous: {', '.join(matches)}. Use the full name.")
    raise FinegrainError(f"No recipe named '{name}'. Available: {', '.join(known) or 'none'} "
                         "(or pass a path to a .yaml file).")


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FinegrainError(f"Recipe {path} is not valid YAML: {exc}. Fix the file.") from exc
    return {} if raw is None else raw


def schema_for(group: str | None) -> type[Recipe]:
    """The recipe class that validates recipes of `group` (e.g. RetrievalRecipe for retrieval)."""
    if group not in GROUP_SCHEMAS:
        return Recipe
    module, _, cls = GROUP_SCHEMAS[group].partition(":")
    return getattr(importlib.import_module(module), cls)


def recipe_group(path: Path) -> str | None:
    """The group of a recipe file under recipes/ ("fgvc", ...), None for a file elsewhere."""
    resolved = path.resolve()
    return resolved.relative_to(RECIPES_DIR).parts[0] if resolved.is_relative_to(RECIPES_DIR) else None


def load_recipe(name: str, overrides: list[str] | None = None, group: str | None = None,
                schema: type[R] | None = None) -> R:
    """Find, read, override and validate a recipe. `name` is a short name or a YAML path; the
    schema defaults to the one of the recipe's group (or of `group` for a file elsewhere)."""
    path = find_recipe(name, group)
    schema = schema or schema_for(recipe_group(path) or group)  # type: ignore[assignment]
    raw = apply_overrides(read_recipe_yaml(path), overrides or [])
    if "name" not in raw:
        resolved = path.resolve()
        raw["name"] = str(resolved.relative_to(RECIPES_DIR).with_suffix("")) \
            if resolved.is_relative_to(RECIPES_DIR) else path.stem
    return recipe_from_dict(raw, schema)  # type: ignore[arg-type]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as YAML, loadable by `load_recipe`."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)
