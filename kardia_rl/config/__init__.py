"""Typed configs from YAML (OmegaConf) with `key=value` overrides; see schema.py for every key."""
from kardia_rl.config.loader import documented_fields, from_dict, load_config, to_dict, to_yaml  # noqa: F401
from kardia_rl.config.schema import RUBRIC_DIMENSIONS, KardiaConfig  # noqa: F401
from kardia_rl.config.validate import validate_config  # noqa: F401
