"""Daemon options from a TOML file (``--config``): keys are the long option names."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def load_config_file(args: argparse.Namespace, paths: dict[str, type[Path]],
                     parser: argparse.ArgumentParser) -> None:
    """Fill options not given on the command line from ``args.config`` (TOML).

    Keys are the long option names (``restore-dir`` or ``restore_dir``); a
    repeatable option takes a list. An option still at *parser*'s default counts as
    not given (so a command-line value equal to the default does not override the
    file's).

    Raises:
        ValueError: unreadable file or unknown key.
    """
    if not getattr(args, "config", None):
        return
    try:
        data = tomllib.loads(Path(args.config).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"config file {args.config}: {err}") from err
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "config" or not hasattr(args, name):
            raise ValueError(f"config file {args.config}: unknown option {key!r}")
        if name in paths:
            value = [paths[name](v) for v in value] if isinstance(value, list) \
                else paths[name](value)
        current = getattr(args, name)
        if current is None or current == [] or current == parser.get_default(name):
            setattr(args, name, value)
