"""Loading a config: YAML file(s) + `key=value` overrides -> a validated `KardiaConfig`.

Errors name the place: `conf/tiny.yaml:12: algo.grop_size: unknown key (did you mean 'group_size'?)`,
`override 'algo.group_size=abc': expected int, got 'abc'`. Every problem is collected before raising, so
one run shows them all.

Composition: a file may start with `defaults: [other.yaml, ...]` (paths relative to the file): those files are
loaded first (recursively, in order) and this file's keys are merged over them. So
defaults <- schema <- defaults' files <- this file <- key=value overrides. conf/rehearsal.yaml uses it to take
conf/cluster.yaml's topology and swap in the tiny model, sample data and short lengths.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kardia_rl.config.schema import REMOVED_KEYS, RENAMED_KEYS, KardiaConfig
from kardia_rl.errors import ConfigError

_TYPES = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict"}


def _key_lines(path: str) -> dict[str, int]:
    """Dotted key -> 1-based line in the YAML file (for error messages)."""
    with open(path, encoding="utf-8") as f:
        node = yaml.compose(f)
    out: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return out


def _renamed(values: dict, where, problems: list[str]) -> bool:
    """Move each renamed key of the nested `values` to its new name (in place), saying so on stderr; both names
    at once is a problem. True when anything moved (the caller rebuilds its layer from `values`)."""
    moved = False
    for old, new in RENAMED_KEYS.items():
        (sec, o), n = old.rsplit(".", 1), new.rsplit(".", 1)[1]
        section = values.get(sec)  # renamed keys are section.key, as every leaf key is
        if not isinstance(section, dict) or o not in section:
            continue
        if n in section:
            problems.append(f"{where(old)}: renamed {new}, which is also set; keep only {new}")
            continue
        section[n] = section.pop(o)
        print(f"{where(old)}: renamed {new}; read as {new}", file=sys.stderr)
        moved = True
    return moved


def _check(schema_cls, values: dict, prefix: str, where, problems: list[str]) -> None:
    """Unknown keys and wrong types of `values` against dataclass `schema_cls`."""
    hints = typing.get_type_hints(schema_cls)
    names = [f.name for f in dataclasses.fields(schema_cls)]
    for key, val in values.items():
        full = f"{prefix}{key}"
        if full in REMOVED_KEYS:
            problems.append(f"{where(full)}: {REMOVED_KEYS[full]}")
            continue
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known keys: {', '.join(names)})"
            problems.append(f"{where(full)}: unknown key{hint}")
            continue
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if isinstance(val, dict):
                _check(typ, val, full + ".", where, problems)
            else:
                problems.append(f"{where(full)}: expected a section (mapping), got {val!r}")
            continue
        if val is None or isinstance(val, str) and val.startswith("${"):
            continue
        ok = (isinstance(val, typ) and not (typ is int and isinstance(val, bool))) or \
             (typ is float and isinstance(val, int) and not isinstance(val, bool))
        if not ok:
            problems.append(f"{where(full)}: expected {_TYPES.get(typ, typ)}, got {val!r}")


def _file_layers(path: str, problems: list[str], chain: tuple = ()) -> list:
    """The OmegaConf layers of `path`: its `defaults:` files first (recursively), then the file itself."""
    if not os.path.isfile(path):
        raise ConfigError(f"{chain[-1] + ': defaults: ' if chain else ''}{path}: config file not found")
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: defaults: cycle ({' -> '.join(chain + (real,))})")
    try:
        file_cfg = OmegaConf.load(path)
        lines = _key_lines(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    raw = OmegaConf.to_container(file_cfg, resolve=False) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    layers = []
    bases = raw.pop("defaults", [])
    if bases:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"{path}:{lines.get('defaults', 1)}: defaults: expected a list of YAML paths, got {bases!r}")
        for base in bases:
            layers += _file_layers(os.path.join(os.path.dirname(path), base), problems, chain + (real,))
        file_cfg = OmegaConf.create(raw)
    where = lambda k: f"{path}:{lines.get(k, 1)}: {k}"  # noqa: E731
    if _renamed(raw, where, problems):
        file_cfg = OmegaConf.create(raw)
    _check(KardiaConfig, raw, "", where, problems)
    return layers + [file_cfg]


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> KardiaConfig:
    """Compose defaults <- YAML file(s) (`defaults:` first) <- overrides, type-check, validate cross-field rules."""
    problems: list[str] = []
    layers = []
    if path:
        layers += _file_layers(path, problems)
    for ov in overrides:
        if "=" not in ov:
            problems.append(f"override {ov!r}: expected key=value")
            continue
        try:
            ov_cfg = OmegaConf.from_dotlist([ov])
        except OmegaConfBaseException as e:
            problems.append(f"override {ov!r}: {e}")
            continue
        values, where = OmegaConf.to_container(ov_cfg, resolve=False), (lambda k, o=ov: f"override {o!r}: {k}")
        if _renamed(values, where, problems):
            ov_cfg = OmegaConf.create(values)
        _check(KardiaConfig, values, "", where, problems)
        layers.append(ov_cfg)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(KardiaConfig), *layers)
        cfg: KardiaConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {str(e).splitlines()[0]}") from None
    from kardia_rl.config.presets import resolve_algo
    from kardia_rl.config.validate import validate_config

    validate_config(resolve_algo(cfg))  # presets fill the unset algo keys before the rules see them
    return cfg


def to_yaml(cfg: KardiaConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(d: dict) -> KardiaConfig:
    """Rebuild a config saved with `to_dict` (checkpoints, Ray actors) and re-validate it."""
    problems: list[str] = []
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}  # renames move keys: the caller's stays
    _renamed(d, lambda k: f"saved config: {k}", problems)  # a checkpoint written before a rename
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(KardiaConfig), d))
    from kardia_rl.config.presets import resolve_algo
    from kardia_rl.config.validate import validate_config

    validate_config(resolve_algo(cfg))
    return cfg


def documented_fields(cls=KardiaConfig, prefix: str = ""):
    """Yield (dotted key, default, doc) for every leaf key: `kardia-rl config docs` and the YAML test."""
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            yield from documented_fields(typ, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", default, f.metadata.get("doc", "")
