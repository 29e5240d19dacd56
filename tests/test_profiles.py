"""Agent profiles (`llm_proxy/profiles.py`, `llm_proxy/agents.py`): the file's validation and
templates directly; selection, prompts, parameters, tools, `/v1/models`, what a round records,
and reloads on SIGHUP through real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest
from sqlalchemy import select

from llm_proxy.models import Round, Task
from llm_proxy.profiles import ConfigError, PromptContext, load_file, render, template_fields
from tests.support import API_KEY, CLI, Proxy, Upstream, headers, marker, run_db, wait_until

COMPANION_KEY = "companion-key-1"
SUPPORT_KEY = "support-key-1"


def _profiles_yaml(upstream: Upstream, companion_prompt: str = "You are Xiaoxue. Today is {weekday}.") -> str:
    return f"""
profiles:
  - name: companion
    keys: ["${{COMPANION_KEY}}"]
    models: ["xiaoxue"]
    default: true
    upstream:
      base_url: {upstream.base_url}
      model: companion-model
      params: {{temperature: 0.8, top_p: 0.9}}
    system_prompt: "{companion_prompt}"
    timezone: Asia/Shanghai
    tools: []
  - name: support
    keys: ["{SUPPORT_KEY}"]
    models: ["support-bot"]
    system_prompt: "Help customers of {{meta.shop}}."
    system_prompt_mode: append
    tools: [current_time]
    history: {{max_rounds: 1}}
  - name: templated
    models: ["templated"]
    system_prompt: "u={{user_id}} r={{room_id}} a={{sdk_app_id}} t={{task_id}} d={{date}} h={{time}} w={{weekday}} z={{timezone}} m={{meta.shop}}"
    timezone: America/New_York
  - {{name: replacing, models: [m-replace], system_prompt: PROFILE, system_prompt_mode: replace}}
  - {{name: prepending, models: [m-prepend], system_prompt: PROFILE, system_prompt_mode: prepend}}
  - {{name: appending, models: [m-append], system_prompt: PROFILE, system_prompt_mode: append}}
  - {{name: ignoring, models: [m-ignore], system_prompt_mode: ignore}}
  - {{name: keeping, models: [m-keep]}}
"""


def _start_profiled(start_proxy, upstream: Upstream, folder: Path) -> Proxy:
    config = folder / "profiles.yaml"
    config.write_text(_profiles_yaml(upstream))
    return start_proxy({"CONFIG_FILE": str(config), "COMPANION_KEY": COMPANION_KEY, "BUILTIN_TOOLS": "true"})


@pytest.fixture(scope="module")
def profiled(start_proxy_for_module, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    """One server for the tests that only read its profiles (the SIGHUP test starts its own)."""
    return _start_profiled(start_proxy_for_module, upstream, tmp_path_factory.mktemp("profiled"))


def _ask(server: Proxy, key: str, model: str, text: str, *, system: str = "REQUEST PROMPT", task_id: str | None = None,
         **extra: Any) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model=model,
        extra_headers=headers(task_id or f"task-{marker()}", **{"X-User-Id": "u-7", "X-Room-Id": "room-9", "X-Sdk-App-Id": "1400"}),
        messages=[{"role": "system", "content": system}, {"role": "user", "content": text}], **extra,
    )
    return reply.choices[0].message.content or ""


def _sent(upstream: Upstream, tag: str) -> dict[str, Any]:
    [body] = upstream.requests(tag)
    return body


def test_a_key_then_a_model_then_the_default_selects_the_profile(profiled: Proxy, upstream: Upstream) -> None:
    tag = marker()
    _ask(profiled, SUPPORT_KEY, "anything", f"{tag} by key", extra_body={"shop": "ACME"})
    by_key = _sent(upstream, f"{tag} by key")
    assert by_key["messages"][0] == {"role": "system", "content": "REQUEST PROMPT\n\nHelp customers of ACME."}
    assert [t["function"]["name"] for t in by_key["tools"]] == ["current_time"]
    _ask(profiled, API_KEY, "support-bot", f"{tag} by model")
    assert _sent(upstream, f"{tag} by model")["messages"][0]["content"].endswith("Help customers of .")
    _ask(profiled, API_KEY, "some-other-model", f"{tag} default")
    default = _sent(upstream, f"{tag} default")
    assert default["model"] == "companion-model" and "tools" not in default
    assert default["messages"][0]["content"].startswith("You are Xiaoxue. Today is ")
    assert (default["temperature"], default["top_p"]) == (0.8, 0.9)
    # The request's own values win over the profile's defaults.
    _ask(profiled, COMPANION_KEY, "xiaoxue", f"{tag} own", temperature=0.1)
    assert (_sent(upstream, f"{tag} own")["temperature"], _sent(upstream, f"{tag} own")["top_p"]) == (0.1, 0.9)


def test_a_key_no_profile_or_api_keys_has_is_refused(profiled: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError):
        _ask(profiled, "not-a-key", "xiaoxue", "hi")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("m-replace", "PROFILE"),
        ("m-prepend", "PROFILE\n\nREQUEST PROMPT"),
        ("m-append", "REQUEST PROMPT\n\nPROFILE"),
        ("m-ignore", None),
        ("m-keep", "REQUEST PROMPT"),
    ],
)
def test_each_system_prompt_mode(profiled: Proxy, upstream: Upstream, model: str, expected: str | None) -> None:
    tag = marker()
    _ask(profiled, API_KEY, model, tag)
    system = [m["content"] for m in _sent(upstream, tag)["messages"] if m["role"] == "system"]
    assert system == ([] if expected is None else [expected])


def test_every_template_variable_is_filled_in(profiled: Proxy, upstream: Upstream) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    _ask(profiled, API_KEY, "templated", tag, task_id=task_id, extra_body={"shop": "ACME"})
    system = _sent(upstream, tag)["messages"][0]["content"]
    now = datetime.now(ZoneInfo("America/New_York"))
    assert system.startswith(f"u=u-7 r=room-9 a=1400 t={task_id} d={now:%Y-%m-%d} h=")
    assert system.endswith(f"w={now:%A} z=America/New_York m=ACME")


def test_a_profile_keeps_its_own_history_limit(profiled: Proxy, upstream: Upstream) -> None:
    tag = marker()
    task_id = f"task-{tag}"
    for n in range(3):
        _ask(profiled, SUPPORT_KEY, "x", f"{tag} {n}", task_id=task_id)
    users = [m["content"] for m in _sent(upstream, f"{tag} 2")["messages"] if m["role"] == "user"]
    assert users == [f"{tag} 1", f"{tag} 2"]  # max_rounds: 1


def test_models_lists_the_profiles_models_and_rounds_record_who_answered(profiled: Proxy, upstream: Upstream) -> None:
    listed = httpx.get(profiled.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert [m["id"] for m in listed["data"]] == ["xiaoxue", "support-bot", "templated", "m-replace", "m-prepend",
                                                  "m-append", "m-ignore", "m-keep"]
    tag = marker()
    task_id = f"task-{tag}"
    _ask(profiled, COMPANION_KEY, "xiaoxue", tag, task_id=task_id)
    stored = run_db(profiled.database_url, lambda conn: conn.execute(
        select(Round.profile, Round.upstream, Round.model).where(Round.task_id == task_id)).one())
    assert tuple(stored) == ("companion", f"{upstream.base_url}#companion-model", "companion-model")


def test_sighup_reloads_for_new_rounds_without_dropping_streams_in_flight(
    start_proxy, upstream: Upstream, tmp_path: Path
) -> None:
    profiled = _start_profiled(start_proxy, upstream, tmp_path)
    config = tmp_path / "profiles.yaml"
    tag = marker()
    streamed: list[str] = []
    started = threading.Event()

    def slow_round() -> None:
        client = openai.OpenAI(base_url=profiled.url + "/v1", api_key=COMPANION_KEY, max_retries=0)
        for chunk in client.chat.completions.create(
            model="xiaoxue", stream=True, extra_headers=headers(f"task-{tag}"),
            messages=[{"role": "user", "content": f"{tag} slow [[words:40]] [[delay:0.03]]"}],
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
                streamed.append(chunk.choices[0].delta.content)

    worker = threading.Thread(target=slow_round)
    worker.start()
    assert started.wait(10)
    config.write_text(_profiles_yaml(upstream, companion_prompt="You are Xiaoxue, version two."))
    os.kill(profiled.pid, signal.SIGHUP)
    wait_until(lambda: "profiles reloaded" in profiled.logs(), timeout=10, what="the reload")
    _ask(profiled, COMPANION_KEY, "xiaoxue", f"{tag} after")
    worker.join(10)
    assert "".join(streamed) == " ".join(f"w{i}" for i in range(40))  # the stream in flight finished whole
    assert _sent(upstream, f"{tag} slow")["messages"][0]["content"].startswith("You are Xiaoxue. Today is")
    assert _sent(upstream, f"{tag} after")["messages"][0]["content"] == "You are Xiaoxue, version two."

    # A bad file on reload: the profiles in use stay, the log says why.
    config.write_text("profiles:\n  - name: broken\n    system_prompt: '{secret.__class__}'\n")
    os.kill(profiled.pid, signal.SIGHUP)
    wait_until(lambda: "the profiles in use stay" in profiled.logs(), timeout=10, what="the refused reload")
    _ask(profiled, COMPANION_KEY, "xiaoxue", f"{tag} still")
    assert _sent(upstream, f"{tag} still")["messages"][0]["content"] == "You are Xiaoxue, version two."


# -- the file, directly ----------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_env_variables_are_expanded_and_a_missing_one_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "profiles:\n  - name: a\n    keys: ['${A_KEY}']\n    upstream: {base_url: 'http://x/v1', api_key: '${UP_KEY}'}\n")
    loaded = load_file(path, {"A_KEY": "k1", "UP_KEY": "secret"})
    assert loaded.profiles[0].keys == ["k1"] and loaded.profiles[0].upstream.api_key == "secret"
    with pytest.raises(ConfigError) as missing:
        load_file(path, {"A_KEY": "k1"})
    assert "${UP_KEY}" in str(missing.value) and "profiles[0].upstream.api_key" in str(missing.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("profiles:\n  - name: bot\n    system_prompt: 'Hi {name}'\n", "profile 'bot', field system_prompt: unknown template variable {name}"),
        ("profiles:\n  - name: bot\n    system_prompt: '{user_id.__class__}'\n", "profile 'bot', field system_prompt: unknown template variable"),
        ("profiles:\n  - name: bot\n    system_prompt: '{date:%Y}'\n", "format specs and conversions are not allowed"),
        ("profiles:\n  - name: bot\n    timezone: Mars/Olympus\n", "profile 'bot', field timezone: unknown time zone"),
        ("profiles:\n  - name: bot\n    system_prompt_mode: shout\n", "profile 'bot', field system_prompt_mode"),
        ("profiles:\n  - name: bot\n    temperature: 1\n", "profile 'bot', field temperature: Extra inputs are not permitted"),
        ("profiles:\n  - {name: a, models: [m]}\n  - {name: b, models: [m]}\n", "two profiles claim the same model 'm'"),
        ("profiles:\n  - {name: a, default: true}\n  - {name: b, default: true}\n", "more than one profile has `default: true`"),
        ("profiles: []\n", "field profiles"),
        ("profiles: [\n", "not valid YAML"),
    ],
    ids=["unknown-variable", "attribute-access", "format-spec", "time-zone", "mode", "unknown-field", "same-model",
         "two-defaults", "empty", "yaml"],
)
def test_a_bad_file_is_refused_naming_the_profile_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_file(_write(tmp_path, text), {})
    assert expected in str(refused.value)


def test_toml_is_accepted_by_extension(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[profiles]]\nname = "bot"\nmodels = ["m"]\nsystem_prompt = "It is {weekday}."\n', "p.toml")
    assert load_file(path, {}).profiles[0].models == ["m"]


def test_templates_render_only_plain_values() -> None:
    context = PromptContext(task_id="t", user_id=None, room_id="r", sdk_app_id="a", meta={"shop": "ACME"})
    now = datetime(2026, 11, 27, 9, 5, tzinfo=ZoneInfo("UTC"))
    text, missing = render("{weekday} {date} {time} {timezone} {user_id}|{meta.shop}|{meta.city}|{{literal}}", "Asia/Shanghai", context, now)
    assert text == "Friday 2026-11-27 17:05 Asia/Shanghai |ACME||{literal}"
    assert missing == ["city"]
    assert template_fields("{meta.shop} {task_id}") == ["meta.shop", "task_id"]


def test_config_check_and_a_server_start_report_a_bad_file(tmp_path: Path, start_proxy) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    good = _write(tmp_path, "profiles:\n  - name: bot\n    models: [m]\n", "good.yaml")
    checked = CliRunner().invoke(cli, ["config", "check", str(good)])
    assert checked.exit_code == 0 and "ok, 1 profile(s): bot" in checked.stdout
    bad = _write(tmp_path, "profiles:\n  - name: bot\n    system_prompt: 'Hi {nickname}'\n", "bad.yaml")
    checked = CliRunner().invoke(cli, ["config", "check", str(bad)])
    assert checked.exit_code == 1 and "profile 'bot', field system_prompt: unknown template variable {nickname}" in checked.stderr
    served = subprocess.run([CLI, "serve", "--port", "1"], env={**os.environ, "CONFIG_FILE": str(bad)},
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 1 and "unknown template variable {nickname}" in served.stderr


def test_config_check_warns_of_what_does_nothing_and_refuses_a_url_that_is_not_http(tmp_path: Path) -> None:
    """The command run in this process (typer's runner): the same code path, without a start."""
    from typer.testing import CliRunner

    from app.cli import cli

    idle = _write(tmp_path, "profiles:\n  - name: bot\n    system_prompt: 'Known: {user_memory}'\n"
                  "    memory: {user_id: header.X-User-Id}\n", "idle.yaml")
    checked = CliRunner().invoke(cli, ["config", "check", str(idle)])
    assert checked.exit_code == 0 and "ok, 1 profile(s)" in checked.stdout
    assert "warning: profile 'bot': {user_memory} in system_prompt is always empty: memory.per_user is off" in checked.stderr
    assert "memory.user_id is not used" in checked.stderr
    ftp = _write(tmp_path, "profiles:\n  - name: bot\n    memory: {summary: true, upstream: {base_url: 'ftp://x/v1'}}\n", "ftp.yaml")
    checked = CliRunner().invoke(cli, ["config", "check", str(ftp)])
    assert checked.exit_code == 1 and "must be an http:// or https:// URL" in checked.stderr


# -- MetaInfo: flattened or nested, in templates, kept with the round, upstream only when asked --


def _meta_body(shape: str) -> dict[str, Any]:
    fields = {"shop": "ACME", "name": "Ann", "temperature": 0.2}
    return {"MetaInfo": fields} if shape == "nested" else fields


def _stored_extra_fields(server: Any, task_id: str) -> list[Any]:
    return run_db(server.database_url, lambda conn: list(conn.execute(
        select(Round.extra_fields).join(Task).where(Task.id == task_id)).scalars()))


@pytest.mark.parametrize("shape", ["nested", "flattened"])
def test_meta_info_reaches_templates_and_the_round_but_not_a_strict_upstream(
    start_proxy, upstream: Upstream, tmp_path: Path, migrated_url: str, shape: str
) -> None:
    config = tmp_path / "profiles.yaml"
    config.write_text(
        f"profiles:\n  - {{name: shop, default: true, system_prompt: 'Help {{meta.name}} of {{meta.shop}}.',"
        f" upstream: {{base_url: '{upstream.base_url}'}}}}\n"
    )
    server = start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": str(config)}, in_process=True)
    tag = marker()
    task_id = f"task-{tag}"
    # A strict upstream (as OpenAI's API is) refuses any field it does not know: the round passing
    # is the proof that none was sent.
    server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"{tag} [[strict:1]]"}], extra_headers=headers(task_id),
        extra_body=_meta_body(shape),
    )
    [sent] = upstream.requests(tag)
    assert sent["messages"][0] == {"role": "system", "content": "Help Ann of ACME."}
    assert sent["temperature"] == 0.2  # an OpenAI parameter in MetaInfo goes upstream, nested or not
    assert not {"MetaInfo", "shop", "name"} & set(sent)
    assert _stored_extra_fields(server, task_id) == [{"shop": "ACME", "name": "Ann"}]


@pytest.mark.parametrize("where", ["profile", "environment"])
def test_extra_fields_go_upstream_where_the_upstream_takes_them(
    start_proxy, upstream: Upstream, tmp_path: Path, where: str
) -> None:
    if where == "profile":
        config = tmp_path / "profiles.yaml"
        config.write_text(
            f"profiles:\n  - {{name: raw, default: true, upstream: {{base_url: '{upstream.base_url}', forward_extra_fields: true}}}}\n"
        )
        server = start_proxy({"CONFIG_FILE": str(config)}, in_process=True)
    else:
        server = start_proxy({"UPSTREAM_FORWARD_EXTRA_FIELDS": "true"}, in_process=True)
    tag = marker()
    server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": tag}], extra_headers=headers(f"task-{tag}"),
        extra_body=_meta_body("nested"),
    )
    [sent] = upstream.requests(tag)
    # As sent: the nested MetaInfo stays one object (its OpenAI parameter is also lifted out).
    assert sent["MetaInfo"] == {"shop": "ACME", "name": "Ann", "temperature": 0.2} and sent["temperature"] == 0.2
    assert "shop" not in sent
