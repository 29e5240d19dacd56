"""Start-up checks, run as operators run them: `config check` runs exactly what `serve` runs
(profiles and the tools they name), a profile naming a built-in tool turns it on, and a bad
setting is one line naming the variable, exit status 1, no traceback. The docs' own profile
example passes the check."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import CLI, ROOT


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BUILTIN_", "TOOLS_", "CALLBACK_", "RETENTION_"))}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**clean, "LOG_LEVEL": "WARNING", **(env or {})})


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_a_profile_naming_a_built_in_tool_turns_it_on(tmp_path: Path) -> None:
    config = tmp_path / "profiles.yaml"
    config.write_text("profiles:\n  - {name: support, default: true, tools: [current_time]}\n")
    checked = _run("config", "check", str(config))
    assert checked.returncode == 0 and "ok, 1 profile(s): support" in checked.stdout, checked.stderr


def test_config_check_finds_a_tool_that_exists_nowhere_as_serve_does(tmp_path: Path) -> None:
    config = tmp_path / "profiles.yaml"
    config.write_text("profiles:\n  - {name: support, default: true, tools: [current_time, order_status]}\n")
    _one_line_error(_run("config", "check", str(config)), "profile 'support'", "order_status")
    served = _run("serve", "--port", "1", env={"CONFIG_FILE": str(config), "DATA_DIR": str(tmp_path)})
    _one_line_error(served, "profile 'support'", "order_status")


def test_the_docs_profile_example_passes_the_check(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "profiles-and-memory.md").read_text()
    example = re.search(r"```yaml\n(profiles:\n.*?)```", page, re.S)
    assert example, "docs/profiles-and-memory.md has no profiles example"
    config = tmp_path / "profiles.yaml"
    config.write_text(example.group(1))
    checked = _run("config", "check", str(config), env={"COMPANION_KEY": "k1", "UPSTREAM_KEY": "k2", "SUPPORT_KEY": "k3"})
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"RETENTION_DAYS": "0"}, ["RETENTION_DAYS", "greater than 0"]),
        ({"DATABASE_URL": "mysql://root@localhost/db"}, ["DATABASE_URL", "'mysql'"]),
        ({"CALLBACK_SIGN_KEY": "   "}, ["CALLBACK_SIGN_KEY", "letters and digits"]),
        ({"CALLBACK_SIGN_KEY": "k" * 33}, ["CALLBACK_SIGN_KEY", "1 to 32"]),
        ({"TTS_WORKERS": "lots"}, ["TTS_WORKERS"]),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path, env: dict[str, str], words: list[str]) -> None:
    for command in (["serve", "--port", "1"], ["db", "upgrade"]):
        _one_line_error(_run(*command, env={"DATA_DIR": str(tmp_path), **env}, cwd=tmp_path), *words)
