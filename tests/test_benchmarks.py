"""Benchmarks are code: each one's `--quick` run must still work (and the soak's audit pass)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("llm_bench.py", ["--db", "sqlite", "--workers", "1"], ["| sqlite | 1 | 50 |"]),
        # The formats table, and the routes table's last row (OpenAI's speech API beside the TRTC route).
        ("tts_bench.py", [], ["| ogg_opus | 1 |", "| 5-sentence paragraph | pcm | 1 | 1 |"]),
        ("soak.py", [], ["| audit violations | 0 |"]),
        # Both settings ran every round, and the bounded WAL ended smaller than the baseline's.
        ("wal_bench.py", [], ["| off (baseline: passive checkpoints only) | 100 | 0 |", "| 1 MB | 100 | 0 |"]),
        # The quality table over the evaluation set (the run fails below 0.9 recall@3 on the Chinese
        # set) and every round of both profiles.
        ("knowledge_bench.py", [], ["| zh | lexical (bigrams + characters) | 34 |",
                                    "| same profile without knowledge | 20 |", "| knowledge: auto, 1,000 chunks, top_k 3 | 20 |"]),
        # Every slow-model round spoke the line; no quick-model round did.
        ("fast_reply_bench.py", [], ["| main model 1500 ms, fast_reply on | 8 |", "| 10 of 10 |", "| 0 of 10 |"]),
        # Every cell, and the hanging engine's line.
        ("remote_voice_bench.py", [], ["| fake engine (150 ms to first bytes) | 8 | 4 |", "A hanging engine"]),
    ],
    ids=["llm", "tts", "soak", "wal", "knowledge", "fast_reply", "remote_voices"],
)
def test_quick_benchmark_runs(script: str, args: list[str], expect: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--no-write", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for line in expect:
        assert line in run.stdout, run.stdout[-3000:]
