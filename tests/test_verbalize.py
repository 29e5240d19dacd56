"""Text normalisation for speech: a table of English and Chinese cases with what the voice is
given, pieces that never cut a number, the CLI, and through the server that a normalised
number is what gets spoken (by duration)."""

from __future__ import annotations

import subprocess

import httpx
import numpy as np
import pytest

from tests.conftest import TTS_KEY
from tests.support import CLI, Proxy
from tts_server.text import pieces
from tts_server.verbalize import Verbalizer, lang_for

ENGLISH = [
    ("I have 3 apples.", "I have three apples."),
    ("It costs $12.50.", "It costs twelve dollars and fifty cents."),
    ("It costs $1.", "It costs one dollar."),
    ("Only $0.99 today.", "Only ninety nine cents today."),
    ("That is $1,200.", "That is one thousand two hundred dollars."),
    ("Pay EUR 3.", "Pay three euros."),
    ("Pay 20 USD.", "Pay twenty dollars."),
    ("Pay €3.20.", "Pay three euros and twenty cents."),
    ("Pay £5.", "Pay five pounds."),
    ("It raised $3.5 million.", "It raised three point five million dollars."),
    ("1,234,567 people came.", "one million two hundred thirty four thousand five hundred and sixty seven people came."),
    ("The 1st and the 22nd.", "The first and the twenty second."),
    ("It is -5 outside.", "It is negative five outside."),
    ("Pi is 3.14.", "Pi is three point one four."),
    ("About 50% of them.", "About fifty percent of them."),
    ("Up 12.5% this year.", "Up twelve point five percent this year."),
    ("It is 25°C.", "It is twenty five degrees Celsius."),
    ("It is 77°F.", "It is seventy seven degrees Fahrenheit."),
    ("See you on 2026-11-27.", "See you on the twenty seventh of november twenty twenty six."),
    ("See you on 11/27.", "See you on November twenty seventh."),
    ("Open 24/7.", "Open twenty four seven."),
    ("At 3:30 pm.", "At three thirty PM."),
    ("At 15:30.", "At fifteen thirty."),
    ("At 9am.", "At nine AM."),
    ("Walk 5 km.", "Walk five kilometers."),
    ("Drive 60 km/h.", "Drive sixty kilometers per hour."),
    ("It weighs 2 kg.", "It weighs two kilograms."),
    ("Add 500 ml.", "Add five hundred milliliters."),
    ("Run 100 m.", "Run one hundred meters."),
    ("Call 555-123-4567.", "Call five five five, one two three, four five six seven."),
    ("Call 13812345678.", "Call one three eight one two three four five six seven eight."),
    ("Call +1 415 555 0100.", "Call one, four one five, five five five, zero one zero zero."),
    ("Your order #12345 shipped.", "Your order number one two three four five shipped."),
    ("Your ID 4821 is ready.", "Your ID four eight two one is ready."),
    ("Dr. Smith is here.", "Doctor Smith is here."),
    ("Mrs. Lee called.", "Missus Lee called."),
    ("We met in St. Louis.", "We met in Saint Louis."),
    ("Cats vs. dogs.", "Cats versus dogs."),
    ("No. 5 is mine.", "number five is mine."),
    ("Add 1/3 cup.", "Add one third cup."),
    ("Use 3/4 of it.", "Use three quarters of it."),
    ("In 1999.", "In nineteen ninety nine."),
    ("In the 1990s.", "In the nineteen nineties."),
    ("About 1000 people.", "About one thousand people."),
    ("COVID-19 is over.", "COVID nineteen is over."),
    ("It is 0.5 mm.", "It is zero point five millimeters."),
    ("Hello there!", "Hello there!"),
]

CHINESE = [
    ("我有3个苹果。", "我有三个苹果。"),
    ("价格是12.5元。", "价格是十二点五元。"),
    ("一共¥12.5。", "一共十二点五元。"),
    ("要￥100。", "要一百元。"),
    ("只要$5。", "只要五美元。"),
    ("要EUR 3。", "要三欧元。"),
    ("20 USD就够了。", "二十美元就够了。"),
    ("有1,234,567人。", "有一百二十三万四千五百六十七人。"),
    ("第3名。", "第三名。"),
    ("气温-5度。", "气温负五度。"),
    ("圆周率3.14。", "圆周率三点一四。"),
    ("增长了50%。", "增长了百分之五十。"),
    ("增长了12.5%。", "增长了百分之十二点五。"),
    ("气温25℃。", "气温二十五摄氏度。"),
    ("气温25°C。", "气温二十五摄氏度。"),
    ("日期2026-11-27。", "日期二零二六年十一月二十七日。"),
    ("2026年11月27日见。", "二零二六年十一月二十七日见。"),
    ("11/27见。", "十一月二十七日见。"),
    ("下午3:30见。", "下午三点三十分见。"),
    ("15:30开会。", "十五点三十分开会。"),
    ("跑了5km。", "跑了五公里。"),
    ("时速60km/h。", "时速每小时六十公里。"),
    ("重2kg。", "重两千克。"),
    ("加500ml水。", "加五百毫升水。"),
    ("电话13812345678。", "电话幺三八幺二三四五六七八。"),
    ("拨打010-12345678。", "拨打零一零一二三四五六七八。"),
    ("订单号12345已发货。", "订单号幺二三四五已发货。"),
    ("加1/3杯。", "加三分之一杯。"),
    ("用3/4。", "用四分之三。"),
    ("1999年。", "一九九九年。"),
    ("90年代。", "九十年代。"),
    ("2个人。", "两个人。"),
    ("今年20岁。", "今年二十岁。"),
    ("跑100米。", "跑一百米。"),
    ("0.5秒。", "零点五秒。"),
    ("第1天。", "第一天。"),
    ("等1小时。", "等一小时。"),
    ("3.5亿人口。", "三点五亿人口。"),
    ("拨打400-800-1234。", "拨打四零零八零零一二三四。"),
    ("今天是周3。", "今天是周三。"),
    ("10:00-12:00开放。", "十点到十二点开放。"),
    ("快了1.5倍。", "快了一点五倍。"),
    ("COVID-19结束了。", "COVID 十九结束了。"),
    ("你好，欢迎光临！", "你好，欢迎光临！"),
]


@pytest.fixture(scope="module")
def verbalizer() -> Verbalizer:
    return Verbalizer()


def test_the_tables_are_long_enough() -> None:
    assert len(ENGLISH) >= 40 and len(CHINESE) >= 40


@pytest.mark.parametrize(("written", "said"), ENGLISH)
def test_english(verbalizer: Verbalizer, written: str, said: str) -> None:
    assert verbalizer(written, "en") == said


@pytest.mark.parametrize(("written", "said"), CHINESE)
def test_chinese(verbalizer: Verbalizer, written: str, said: str) -> None:
    assert verbalizer(written, "zh") == said


def test_what_a_grammar_cannot_take_is_spoken_as_written(verbalizer: Verbalizer) -> None:
    """wetext raises on some inputs ("5 %%"): the piece is then spoken as the glue left it."""
    assert verbalizer("It is 5 %%.", "en") == "It is 5 %%."
    assert verbalizer("Now +5 and @5.", "en") == "Now plus five and at five."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The price is $12.50. Thanks a lot, see you then.", ["The price is $12.50.", "Thanks a lot, see you then."]),
        ("Call me at 3:30 pm, or at 1,234 other times today because I am free.",
         ["Call me at 3:30 pm,", "or at 1,234 other times today because I am free."]),
        ("Dr. Smith said 3.14 is pi. Really?", ["Dr. Smith said 3.14 is pi.", "Really?"]),
        ("价格是12.5元，2026年11月27日下午3:30见。", ["价格是12.5元，", "2026年11月27日下午3:30见。"]),
        ("我们在2026年11月27日下午见面好吗", ["我们在2026年11月27日", "下午见面好吗"]),
    ],
)
def test_pieces_are_never_cut_inside_a_number_price_time_or_date(text: str, expected: list[str]) -> None:
    assert pieces(text) == expected


def test_which_grammar_a_piece_gets() -> None:
    assert lang_for("zh", "en_US") == "zh"
    assert lang_for(None, "en_US") == "en"
    assert lang_for(None, "de_DE") is None  # a German voice reads its own numbers
    assert lang_for("ru", "en_US") is None


def test_the_cli_prints_what_will_be_spoken() -> None:
    out = subprocess.run(
        [CLI, "tts", "normalize", "It costs $12.50. 价格是12.5元。"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[en] It costs twelve dollars and fifty cents.", "[zh] 价格是十二点五元。"]
    forced = subprocess.run([CLI, "tts", "normalize", "3.14", "--lang", "zh"], capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "[zh] 三点一四"


def _seconds(server: Proxy, text: str) -> float:
    response = httpx.post(
        server.url + "/api/v1/tts/stream", json={"Text": text, "Format": "pcm", "SampleRate": 16000},
        headers={"Authorization": f"Bearer {TTS_KEY}"}, timeout=60,
    )
    assert response.status_code == 200
    return len(np.frombuffer(response.content, dtype="<i2")) / 16000


def test_a_normalised_number_is_what_the_voice_says(tts: Proxy, start_tts) -> None:
    """The price and the phone number last as long as their words spelled out (within 10%: the
    spelled-out phone number, twelve words, is cut into two pieces for an early first audio, which
    adds a piece's edges of silence), and clearly not as long as without normalisation."""
    for written, spelled in [
        ("It costs $12.50.", "It costs twelve dollars and fifty cents."),
        ("Call 13812345678.", "Call one three eight one two three four five six seven eight."),
    ]:
        normalised, reference = _seconds(tts, written), _seconds(tts, spelled)
        assert abs(normalised - reference) < 0.1 * reference, (written, normalised, reference)
    plain = start_tts({"TTS_NORMALIZE": "false"})
    # Unnormalised, the phone number is read as thirteen billion eight hundred ...: a different length.
    as_written, spelled_out = _seconds(plain, "Call 13812345678."), _seconds(tts, "Call 13812345678.")
    assert abs(as_written - spelled_out) > 0.15 * spelled_out, (as_written, spelled_out)
