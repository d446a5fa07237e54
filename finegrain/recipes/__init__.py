"""Training recipes: YAML files that mirror the paper's tables, validated against a typed schema.

A recipe is plain YAML; every key it may hold is a field of the dataclasses in `schema`
(common sections), `retrieval` and `backbone` (their extra sections), so a typo, a wrong type
or an out-of-range value is caught before a long run starts, with a message naming the key and
what it must be. Any value can be overridden from the command line with `--set a.b=value`
(the value is parsed as YAML, so `--set optim.lr=1e-4`, `--set data.root=null` and
`--set model.overrides={base_width: 8}` all work).

Other tasks extend the schema by subclassing `Recipe` with extra sections (and rules) and
passing their class to `load_recipe(..., schema=...)`. This package imports neither torch nor
the training code: `finegrain recipes` and every command's argument checks stay fast.
"""
from finegrain.recipes.backbone import BackboneRecipe
from finegrain.recipes.compare import same_recipe_or_error
from finegrain.recipes.loading import (GROUP_SCHEMAS, MAX_RECIPE_BYTES, RECIPES_DIR, RecipeLoader, apply_overrides,
                                       find_recipe, list_recipes, load_recipe, parse_yaml, read_recipe_yaml,
                                       recipe_group, recipe_to_dict, recipe_to_yaml, schema_for)
from finegrain.recipes.retrieval import LossConfig, RetrievalConfig, RetrievalRecipe
from finegrain.recipes.schema import (DataConfig, DropBlockConfig, KDConfig, MixupConfig, ModelConfig, OptimConfig,
                                      OutputConfig, Recipe, RegularizationConfig, ScheduleConfig, TrainConfig)
from finegrain.recipes.validation import recipe_from_dict

__all__ = [
    "GROUP_SCHEMAS", "MAX_RECIPE_BYTES", "RECIPES_DIR", "BackboneRecipe", "DataConfig", "DropBlockConfig", "KDConfig",
    "LossConfig", "MixupConfig", "ModelConfig", "OptimConfig", "OutputConfig", "Recipe", "RecipeLoader",
    "RegularizationConfig", "RetrievalConfig", "RetrievalRecipe", "ScheduleConfig", "TrainConfig", "apply_overrides",
    "find_recipe", "list_recipes", "load_recipe", "parse_yaml", "read_recipe_yaml", "recipe_from_dict",
    "recipe_group", "recipe_to_dict", "recipe_to_yaml", "same_recipe_or_error", "schema_for",
]
