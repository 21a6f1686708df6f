"""Configuration files: ``--config FILE.toml`` supplies defaults for any flag of any subcommand.

The file holds one table per subcommand, keyed by flag name without the leading dashes (``json = true`` for
``--json``; dashes or underscores inside a name)::

    [pack]
    image-size = 224
    limit-images = 4
    tokenizer = "sample_data/tokenizers/clip"

    [audit-labels]
    fail-on = ["unknown", "misaligned"]

Flags given on the command line win over the file. Unknown tables or keys are a usage error (exit 2) that lists
the valid names, so a typo never silently does nothing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmprep.errors import ConfigError

__all__ = ["load_config", "to_default_map"]


def load_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML config file into ``{subcommand: {flag: value}}`` (names as written)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(
                f"{p}: top-level key '{key}' must be a table such as [{key}]",
                hint="put each subcommand's defaults under a [subcommand] table",
            )
    return data


def to_default_map(
    path: str | Path,
    data: Mapping[str, Mapping[str, Any]],
    commands: Mapping[str, Mapping[str, str]],
) -> dict[str, dict[str, Any]]:
    """Validate a loaded config against the known subcommands and their flags.

    Args:
        path: the file, for messages.
        data: ``load_config`` output.
        commands: subcommand name -> {config key: parameter name}, where a config key is the flag's long name
            without the dashes (``json`` for ``--json``, ``image-size`` for ``--image-size``).

    Returns:
        A click ``default_map``: ``{subcommand: {param_name: value}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in commands:
            raise ConfigError(
                f"{path}: unknown section [{section}]",
                hint="valid sections: " + ", ".join(sorted(commands)),
            )
        keys = commands[section]
        mapped: dict[str, Any] = {}
        for key, value in values.items():
            name = keys.get(key.replace("_", "-"))
            if name is None:
                raise ConfigError(
                    f"{path}: [{section}] has unknown key '{key}'",
                    hint="valid keys: " + ", ".join(sorted(keys)),
                )
            mapped[name] = value
        out[section] = mapped
    return out
