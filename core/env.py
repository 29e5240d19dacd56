"""`${VAR}` in the configuration files (the profiles file, `voices.yaml`), read from the
environment when the file is loaded, so secrets stay out of the file."""

from __future__ import annotations

import re
from typing import Any, Mapping

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UnsetVariable(Exception):
    """A value names a variable the environment lacks: `name`, and `where` the value is (its
    path in the file: `profiles[0].upstream.api_key`; empty for the top)."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"{where or 'a value'} uses ${{{name}}}, which is not set in the environment")
        self.name = name
        self.where = where


def expand_env(value: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """`value` (strings, and lists and mappings of them) with every `${VAR}` replaced."""
    if isinstance(value, str):
        def variable(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise UnsetVariable(name, where)
            return environ[name]

        return _ENV_VAR.sub(variable, value)
    if isinstance(value, list):
        return [expand_env(item, environ, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: expand_env(item, environ, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
    return value
