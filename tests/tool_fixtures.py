"""Tools the function-calling tests load into the proxy (`TOOLS_MODULES=tests.tool_fixtures`)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from langchain_core.tools import tool

_meeting = asyncio.Event()
_arrived: set[str] = set()


@tool
def echo(text: str) -> str:
    """Say the text back."""
    return text


async def meet(name: str) -> str:
    """Wait until the other caller arrives too: only calls that run at the same time both return."""
    _arrived.add(name)
    if len(_arrived) >= 2:
        _meeting.set()
    await _meeting.wait()
    return f"met {name}"


def boom() -> str:
    """Always fails."""
    raise RuntimeError("the tool broke")


async def sleepy() -> str:
    """Takes far longer than the tool timeout."""
    await asyncio.sleep(60)
    return "too late"


async def gate(name: str) -> str:
    """Returns once the test creates the file `name` in GATE_DIR (so a test can hold a tool open);
    `name.running` says it has started."""
    path = Path(os.environ["GATE_DIR"]) / name
    path.with_name(name + ".running").touch()
    while not path.exists():
        await asyncio.sleep(0.01)
    return f"opened {name}"


def count(key: str) -> str:
    """Counts its calls per key in COUNT_DIR (so a test can see whether a tool ran again)."""
    path = Path(os.environ["COUNT_DIR"]) / key
    with path.open("a") as handle:
        handle.write("x")
    return f"counted {key}"


TOOLS = [echo, meet, boom, sleepy, gate, count]
