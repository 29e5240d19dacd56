"""The TTS server's plain modules, tested directly: text rules, audio encoding, the pool."""

from __future__ import annotations

import asyncio
import io
import threading
import wave

import numpy as np
import pytest

from tts_server.audio import PcmEncoder, wav_header
from tts_server.pool import SynthesisPool
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_server.text import MAX_PIECE_WEIGHT, language, normalize, pieces, readable, weight
from tts_server.voices import _runs_of_words


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("**Bold** and *italic* and __under__ and ~~gone~~", "Bold and italic and under and gone"),
        ("# Title\n## Sub", "Title\nSub"),
        ("- one\n* two\n+ three\n1. four\n2) five", "one\ntwo\nthree\nfour\nfive"),
        ("> quoted", "quoted"),
        ("see [the docs](https://x.y/z) and ![a chart](c.png)", "see the docs and a chart"),
        ("visit https://example.com/a?b=c or www.example.org now", "visit or now"),
        ("great 😀👍🏽 job 🇨🇳 ✅", "great job"),
        ("`code` and ```\nblock\n```", "code and\nblock"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "a b\n1 2"),
        ("snake_case stays", "snake_case stays"),
        ("<b>bold</b> tag", "bold tag"),
        ("你好，**世界**！😀", "你好，世界！"),
        ("2^3 is issue #5", "2 3 is issue 5"),
    ],
)
def test_normalize_leaves_only_what_should_be_said(text: str, said: str) -> None:
    assert normalize(text) == said


def test_sentences_are_pieces_and_a_long_first_sentence_is_cut_early() -> None:
    assert pieces("Hi there! How are you? Fine.") == ["Hi there!", "How are you?", "Fine."]
    first, *rest = pieces("Well, to be honest with you, the weather today is lovely. Let us go out.")
    assert first == "Well, to be honest with you," and rest == ["the weather today is lovely.", "Let us go out."]
    first, second = pieces("The quick brown fox jumps over the lazy dog near the quiet river bank today.")
    assert len(first.split()) <= 6 and f"{first} {second}".startswith("The quick brown fox")


def test_chinese_is_cut_at_chinese_punctuation() -> None:
    assert pieces("你好，世界！这是流式 TTS API 的测试。") == ["你好，世界！", "这是流式 TTS API 的测试。"]
    first, *rest = pieces("今天天气很好，我们一起去公园散步吧，然后去吃饭好不好？好的。")
    assert first == "今天天气很好，" and rest[-1] == "好的。"
    assert "".join([first, *rest]) == "今天天气很好，我们一起去公园散步吧，然后去吃饭好不好？好的。"


def test_language_of_a_piece() -> None:
    assert language("你好 world") == "zh"
    assert language("こんにちは") == "ja"
    assert language("안녕하세요") == "ko"
    assert language("Hello, 42!") is None
    assert language("مرحبا") == "ar" and language("Привет") == "ru" and language("שלום") == "he"
    assert language("Γειά σου") == "el" and language("สวัสดี") == "th" and language("नमस्ते") == "hi"


def test_control_characters_are_not_read() -> None:
    assert normalize("a\u0000b\u0007c\td") == "a b c d"
    assert pieces("\u0000\u0001") == []


def test_wav_header_is_streaming_pcm() -> None:
    header = wav_header(16000, 2)
    assert len(header) == 44 and header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt "
    with wave.open(io.BytesIO(header + b"\x01\x00\x02\x00" * 10)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 2, 2)
        assert wav.readframes(100) == b"\x01\x00\x02\x00" * 10


def test_resampling_is_continuous_across_pieces() -> None:
    rate = 22050
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    whole = PcmEncoder(rate, 16000, 1)
    at_once = whole.encode(tone) + whole.flush()
    pieced = PcmEncoder(rate, 16000, 1)
    parts = b"".join(pieced.encode(part) for part in np.array_split(tone, 7)) + pieced.flush()
    a, b = np.frombuffer(at_once, "<i2"), np.frombuffer(parts, "<i2")
    assert abs(len(a) - 16000) <= 2 and len(a) == len(b)
    assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 2  # no clicks at the seams


def test_stereo_duplicates_mono() -> None:
    samples = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    stereo = np.frombuffer(PcmEncoder(16000, 16000, 2).encode(samples), "<i2").reshape(-1, 2)
    assert np.array_equal(stereo[:, 0], stereo[:, 1]) and len(stereo) == 100


def test_the_job_due_soonest_runs_first_and_unstarted_jobs_can_be_withdrawn() -> None:
    """A stream about to run dry (due in 0.1 s) goes before a new stream's first piece (due in
    0.4 s: its first-audio target less its synthesis), which goes before a stream with seconds
    of audio still to play."""

    async def scenario() -> list[str]:
        pool = SynthesisPool(1)
        ran: list[str] = []
        gate = threading.Event()
        blocker = pool.submit(gate.wait, 0.0)
        await blocker.started.wait()
        now = 100.0
        comfortable = pool.submit(lambda: ran.append("comfortable"), now + 3.0)
        withdrawn = pool.submit(lambda: ran.append("withdrawn"), now)
        first = pool.submit(lambda: ran.append("new stream"), now + 0.4)
        running_dry = pool.submit(lambda: ran.append("running dry"), now + 0.1)
        assert pool.withdraw(withdrawn)
        gate.set()
        await asyncio.gather(blocker.result, comfortable.result, first.result, running_dry.result)
        assert not pool.withdraw(first)  # already ran
        pool.close()
        return ran

    assert asyncio.run(scenario()) == ["running dry", "new stream", "comfortable"]


WORST_TEXTS = {
    "a price of 1990 digits": "$" + "9" * 1990,
    "a sentence without a mark": "word " * 400,
    "one long word": "a" * 2000,
    "spelled-out digits": "nine " * 400,
    "thousands separators": "9,999" * 400,
    "CJK without a mark": "你好" * 1000,
}


@pytest.mark.parametrize("text", WORST_TEXTS.values(), ids=WORST_TEXTS.keys())
def test_no_piece_of_the_worst_texts_is_over_the_bound(text: str) -> None:
    cut = pieces(text[:2000])
    assert cut and all(weight(piece) <= MAX_PIECE_WEIGHT for piece in cut)


def test_long_runs_of_digits_are_read_in_groups_and_numbers_stay_whole() -> None:
    assert " ".join(pieces("Call 1234567890123456789 now.")) == "Call 1234 5678 9012 3456 789 now."
    assert pieces("It is $1,234,567.89 today.") == ["It is $1,234,567.89 today."]


def test_a_long_sentence_is_cut_at_a_clause_mark_then_at_a_space() -> None:
    sentence = "First " + "part " * 12 + "ends here, and then " + "more words " * 20 + "follow."
    first, *rest = pieces("Hello. " + sentence)
    assert first == "Hello." and all(weight(piece) <= MAX_PIECE_WEIGHT for piece in rest)
    assert rest[0].endswith("ends here,") and " ".join(rest) == sentence


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab 9,.:$你。\n!"), max_size=2000))
def test_every_piece_is_bounded_and_nothing_is_lost(text: str) -> None:
    cut = pieces(text)
    assert all(weight(piece) <= MAX_PIECE_WEIGHT for piece in cut)
    # Every letter survives, in order (digits may be regrouped, marks at cuts may go).
    letters = [c for c in text if c in "ab你"]
    assert [c for c in "".join(cut) if c in "ab你"] == letters


def test_text_in_a_script_no_voice_reads_is_not_readable() -> None:
    assert not readable("ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ") and readable("ᏣᎳᎩ 5") and readable("Hello") and readable("你好")


def test_a_piper_call_is_given_runs_of_whole_words() -> None:
    phonemes = list("ab cd ef gh") * 3
    runs = _runs_of_words(phonemes, 8)
    assert sum(runs, []) == phonemes and all(len(run) <= 8 for run in runs)
    assert all(run[-1] == " " for run in runs[:-1])
    assert _runs_of_words(list("x" * 20), 8) == [list("x" * 8), list("x" * 8), list("x" * 4)]
