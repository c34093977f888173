"""The command-line face of the config: the one `[CONFIG] [key=value ...]` convention every command uses, and
`kardia-rl config show|docs`.

CONFIG is optional (built-in defaults without it); when the first positional is a key=value override rather
than an existing file, it is taken as an override. Options may stand between or after the overrides
(kardia_rl.cli appends leftover key=value words to `args.overrides`).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


def add_config_args(p: argparse.ArgumentParser, config_help: str = "YAML config (default: built-in defaults)",
                    example: str = "algo.group_size=8") -> None:
    p.add_argument("config", nargs="?", default=None, help=config_help)
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def is_override(text: str) -> bool:
    """A key=value word rather than a path (a config file named a=b.yaml that exists stays a file)."""
    return "=" in text and not os.path.exists(text)


def config_source(args: argparse.Namespace, extra: Sequence[str] = ()) -> tuple[Optional[str], list[str]]:
    """(config path or None, overrides + extra) of a command's arguments; a key=value first positional is an
    override. For commands that load variants of one config (judge agreement: one per judge)."""
    config, overrides = args.config, list(args.overrides or [])
    if config and is_override(config):
        config, overrides = None, [config] + overrides
    return config, overrides + list(extra)


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()):
    """The KardiaConfig of a command's `[CONFIG] [key=value ...]`, with `extra` overrides applied last."""
    from kardia_rl.config.loader import load_config

    return load_config(*config_source(args, extra))


def cmd_config(args: argparse.Namespace) -> int:
    from kardia_rl.config.loader import documented_fields, to_yaml

    if args.action == "docs":
        for key, default, text in documented_fields():
            print(f"{key} = {default!r}\n    {text}")
        return 0
    print(to_yaml(config_from_args(args)), end="")
    return 0


def configure_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "docs"], help="show: merged config; docs: every key documented")
    add_config_args(p)


cmd_config.configure = configure_config
