"""Text fit for a speaker as it streams (`tts_server/speakable.py`): English and Chinese samples,
each cut at every possible chunk boundary, and through real HTTP with a profile's
`output.speakable`."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tts_server.speakable import SpeakableFilter
from tests.support import headers, marker

SAMPLES = [
    (
        "## Weather today\n\n**Sunny** and *warm*, see [the forecast](https://example.com/f).\n- Bring `water`\n"
        "- Wear a hat 😀\n\n| day | temp |\n|---|---|\n| Mon | 25 |\n\n---\nVisit https://example.com/x for more.",
        "Weather today\n\nSunny and warm, see the forecast.\nBring water\nWear a hat \n\n  day   temp  \n  Mon   25  \n\n"
        "Visit  for more.",
    ),
    (
        "### 今天的天气\n**晴天**，气温*25度*。\n1. 带水\n2. 戴帽子 🎉\n> 注意防晒\n```python\nprint(1)\n```\n详见[预报](http://x.cn/y)。",
        "今天的天气\n晴天，气温25度。\n带水\n戴帽子 \n注意防晒\nprint(1)\n详见预报。",
    ),
    (
        "user_id is <b>important</b>, 3.5 kg, -5 degrees, 12:30 meeting, a < b > c, h and w, wow!",
        "user_id is important, 3.5 kg, -5 degrees, 12:30 meeting, a < b > c, h and w, wow!",
    ),
    ("  - indented item\n_italic_ and __bold__\n![cat](pic.png) here", "indented item\nitalic and bold\ncat here"),
    ("请访问 www.example.com 或 https://a.b/c，谢谢！~~删除~~", "请访问  或 ，谢谢！删除"),
]


def _run(chunks: list[str]) -> str:
    speakable = SpeakableFilter()
    return "".join(speakable.feed(chunk) for chunk in chunks) + speakable.flush()


@pytest.mark.parametrize(("text", "expected"), SAMPLES, ids=["english", "chinese", "not-marks", "starts", "urls"])
def test_marks_are_removed_wherever_the_chunks_are_cut(text: str, expected: str) -> None:
    assert _run([text]) == expected
    for cut in range(len(text) + 1):
        assert _run([text[:cut], text[cut:]]) == expected, cut
    assert _run(list(text)) == expected


def test_text_is_held_back_only_while_a_mark_may_be_open() -> None:
    speakable = SpeakableFilter()
    assert speakable.feed("Plain words go out at once") == "Plain words go out at once"
    assert speakable.feed(" and [a link") == " and "  # held: it may become a link
    assert speakable.feed("](x) done.\n") == "a link done.\n"
    assert speakable.feed("#") == ""  # a heading, or not: one more character tells
    assert speakable.feed("# Title") == "Title"


def test_a_profile_makes_replies_speakable(start_proxy, tmp_path: Path) -> None:
    config = tmp_path / "profiles.yaml"
    config.write_text("profiles:\n  - {name: voice, default: true, output: {speakable: true}}\n")
    server = start_proxy({"CONFIG_FILE": str(config)}, in_process=True)
    text, expected = SAMPLES[1]
    encoded = base64.urlsafe_b64encode(text.encode()).decode()
    tag = marker()
    task_id = f"task-{tag}"
    chunks = [
        c.choices[0].delta.content
        for c in server.client().chat.completions.create(
            model="m", stream=True, extra_headers=headers(task_id),
            messages=[{"role": "user", "content": f"{tag} [[reply64:{encoded}]] [[chunk_chars:3]] [[delay:0.002]]"}],
        )
        if c.choices and c.choices[0].delta.content
    ]
    assert "".join(chunks) == expected
    assert server.rounds(task_id)[0]["messages"][-1]["content"] == expected  # stored as streamed
