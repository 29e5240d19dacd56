"""Numbers, prices, dates, times, units and abbreviations written out as they are said, before a
piece goes to the voice (whose phonemizer would otherwise guess: "$12.50" as "dollar twelve
point five zero", "13812345678" as thirteen billion ...).

The grammars are WeTextProcessing's (the `wetext` runtime, its compiled FSTs shipped in the
wheel: nothing is downloaded), English and Chinese. What they get wrong for a voice assistant is
rewritten first, by the glue below: prices in dollars and cents, currency codes, month/day dates,
decades, phone numbers and ids read digit by digit, a few abbreviations. `num2words` spells the
numbers the glue produces. A piece either grammar cannot take (it raises on some inputs) is spoken
as the glue left it: normalisation never costs a stream its audio.

Pieces are cut before this runs (`text.pieces`), at boundaries that never fall inside a number,
price, time or date, so normalising a piece never needs its neighbour.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Callable, Literal

from num2words import num2words

from tts_server.text import ABBREVIATIONS

log = logging.getLogger("trtc.tts")

Lang = Literal["en", "zh"]

# Anything the grammars would change: digits, currency and unit signs, and the abbreviations of
# the glue. A piece without any skips the grammars (most pieces: a few ms each saved).
_SIGNS = re.compile(r"[0-9$€£¥￥%℃°#&@]")
_NEEDS_WORK = re.compile(rf"{_SIGNS.pattern}|\b(?:{ABBREVIATIONS})\.")

_DIGIT_NAMES_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_NAMES_ZH = "零幺二三四五六七八九"
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_CURRENCY_EN = {"$": ("dollar", "dollars", "cent", "cents"), "USD": ("dollar", "dollars", "cent", "cents"),
                "€": ("euro", "euros", "cent", "cents"), "EUR": ("euro", "euros", "cent", "cents"),
                "£": ("pound", "pounds", "penny", "pence"), "GBP": ("pound", "pounds", "penny", "pence"),
                "¥": ("yuan", "yuan", "fen", "fen"), "￥": ("yuan", "yuan", "fen", "fen"),
                "CNY": ("yuan", "yuan", "fen", "fen"), "RMB": ("yuan", "yuan", "fen", "fen"),
                "JPY": ("yen", "yen", "sen", "sen")}
_CURRENCY_ZH = {"USD": "美元", "EUR": "欧元", "GBP": "英镑", "CNY": "元", "RMB": "元", "JPY": "日元", "HKD": "港元"}
_ABBREVIATIONS_EN = {"Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "vs.": "versus", "etc.": "et cetera", "e.g.": "for example", "i.e.": "that is",
                     "Prof.": "Professor", "Jr.": "Junior", "Sr.": "Senior"}

_AMOUNT = r"(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{1,2}))?"
_CODES = "|".join(code for code in _CURRENCY_EN if code.isalpha())
_PRICE_SIGN_EN = re.compile(rf"(?<![\w$€£¥￥])([$€£¥￥])\s?{_AMOUNT}(?:\s?(million|billion|thousand))?(?![\d.,]\d)")
_PRICE_CODE_EN = re.compile(rf"\b(?:({_CODES})\s?{_AMOUNT}|{_AMOUNT}\s?({_CODES}))\b")
# Chinese letters count as word characters, so Latin codes are bounded by "no Latin letter".
_PRICE_CODE_ZH = re.compile(
    rf"(?<![A-Za-z])({'|'.join(_CURRENCY_ZH)})\s?(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)\s?({'|'.join(_CURRENCY_ZH)})(?![A-Za-z])"
)
# Month/day: read as a date when it cannot be a fraction a speaker would write (day 13 or more,
# or two-digit parts like 05/06); 1/3 and 3/4 stay fractions.
_MONTH_DAY = re.compile(r"(?<![\d/])(0?[1-9]|1[0-2])/(0[1-9]|[12]\d|3[01])(?![\d/])")
_TWENTY_FOUR_SEVEN = re.compile(r"\b24/7\b")
_DECADE = re.compile(r"\b(1[0-9]|20)([1-9]0)s\b")
_ROUND_THOUSANDS = re.compile(r"(?<![\d,.])([1-9])000(?![\d,.])")
# Phone numbers (+country, groups split by spaces or hyphens; not an ISO date) and long digit
# runs: one digit at a time, a pause between groups.
_PHONE = re.compile(r"(?<![\w.,])(?!\d{4}-\d{1,2}-\d{1,2}(?!\d))\+?\d{1,4}(?:[ -]\d{2,4}){2,}(?!\w|[.,]\d)")
_DIGIT_RUN = re.compile(r"(?<![\w.,])\d{7,}(?!\w|[.,]\d)")
_ID_EN = re.compile(r"(?:#|\b(?:ID|id|No\.|code|order|PIN|pin)\s?#?)\s?(\d{3,})\b")
_NUMBER_SIGN_EN = re.compile(r"\bNo\.\s?(?=\d)")
_SAINT = re.compile(r"\bSt\.\s(?=[A-Z])")
_METRES = re.compile(r"(\d)\s?m\b(?!/)")
_WORD_DASH_NUMBER = re.compile(r"(?<=[A-Za-z])-(?=\d)")
# A leading plus or at sign before a number (which the grammar cannot take).
_SIGNED = re.compile(r"(?<![\w+])[+@](?=\d)")
_ID_ZH = re.compile(r"(?:订单号|编号|单号|账号|工号|验证码|ID|#)\s?(\d{3,})")


def _words(number: int | float) -> str:
    return str(num2words(number)).replace(",", "").replace("-", " ")


def _digits_en(digits: str) -> str:
    groups = re.findall(r"\d+", digits)
    return ", ".join(" ".join(_DIGIT_NAMES_EN[int(d)] for d in group) for group in groups)


def _digits_zh(digits: str) -> str:
    return "".join(_DIGIT_NAMES_ZH[int(d)] for d in re.sub(r"\D", "", digits))


def _price_en(sign: str, whole: str, cents: str | None, scale: str | None = None) -> str:
    one, many, cent, cents_name = _CURRENCY_EN[sign]
    units = int(whole.replace(",", ""))
    if scale:
        fraction = f" point {' '.join(_DIGIT_NAMES_EN[int(d)] for d in cents)}" if cents else ""
        return f"{_words(units)}{fraction} {scale} {many}"
    hundredths = int((cents or "0").ljust(2, "0"))
    parts = []
    if units or not hundredths:
        parts.append(f"{_words(units)} {one if units == 1 else many}")
    if hundredths:
        parts.append(f"{_words(hundredths)} {cent if hundredths == 1 else cents_name}")
    return " and ".join(parts)


def _glue_en(text: str) -> str:
    text = _PHONE.sub(lambda m: _digits_en(m.group(0)), text)
    text = _DIGIT_RUN.sub(lambda m: _digits_en(m.group(0)), text)
    text = _ID_EN.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)].replace("#", "number ") + _digits_en(m.group(1)), text)
    text = _PRICE_SIGN_EN.sub(lambda m: _price_en(m.group(1), m.group(2), m.group(3), m.group(4)), text)
    text = _PRICE_CODE_EN.sub(
        lambda m: _price_en(m.group(1), m.group(2), m.group(3)) if m.group(1) else _price_en(m.group(6), m.group(4), m.group(5)),
        text,
    )
    text = _TWENTY_FOUR_SEVEN.sub("twenty four seven", text)
    text = _MONTH_DAY.sub(lambda m: _month_day_en(int(m.group(1)), int(m.group(2)), m.group(0)), text)
    text = _DECADE.sub(lambda m: f"{_words(int(m.group(1)))} {_words(int(m.group(2)))[:-1]}ies", text)
    text = _ROUND_THOUSANDS.sub(lambda m: f"{_words(int(m.group(1)))} thousand", text)
    text = _NUMBER_SIGN_EN.sub("number ", text)
    text = _SAINT.sub("Saint ", text)
    text = _METRES.sub(r"\1 meters", text)
    text = _WORD_DASH_NUMBER.sub(" ", text)
    text = _SIGNED.sub(lambda m: "plus " if m.group(0) == "+" else "at ", text)
    for abbreviation, spoken in _ABBREVIATIONS_EN.items():
        text = text.replace(abbreviation, spoken)
    return text


def _month_day_en(month: int, day: int, written: str) -> str:
    if day < 13 and not written.startswith("0") and "/0" not in written:
        return written  # 1/3, 3/4: a fraction
    return f"{_MONTHS[month - 1]} {num2words(day, to='ordinal').replace('-', ' ')}"


def _glue_zh(text: str) -> str:
    text = _PRICE_CODE_ZH.sub(
        lambda m: f"{m.group(2)}{_CURRENCY_ZH[m.group(1)]}" if m.group(1) else f"{m.group(3)}{_CURRENCY_ZH[m.group(4)]}", text
    )
    text = _ID_ZH.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)].replace("#", "") + _digits_zh(m.group(1)), text)
    text = _WORD_DASH_NUMBER.sub(" ", text)
    return text


class Verbalizer:
    """The grammars, loaded once (about 0.4 s for both) and shared by the synthesis threads: a
    lock per language, as a normalizer is not documented as thread-safe (it runs in about 1 to
    20 ms per piece)."""

    def __init__(self) -> None:
        self._grammars: dict[Lang, tuple[threading.Lock, Callable[[str], str]]] = {}
        self._loading = threading.Lock()

    def _grammar(self, lang: Lang) -> tuple[threading.Lock, Callable[[str], str]]:
        with self._loading:
            if lang not in self._grammars:
                from wetext import Normalizer

                self._grammars[lang] = (threading.Lock(), Normalizer(lang=lang, operator="tn").normalize)
            return self._grammars[lang]

    def warm_up(self) -> None:
        for lang in ("en", "zh"):
            self(f"{lang} 1", lang)  # type: ignore[arg-type]

    def __call__(self, text: str, lang: Lang) -> str:
        """`text` as it should be spoken in `lang`."""
        if not _NEEDS_WORK.search(text):
            return text
        try:
            glued = _glue_en(text) if lang == "en" else _glue_zh(text)
        except Exception as exc:  # num2words refuses some numbers: speak the text as written
            log.warning("text normalisation failed (%s: %s); speaking the text as written", type(exc).__name__, exc)
            return text
        if not _SIGNS.search(glued):
            return glued
        lock, normalize = self._grammar(lang)
        try:
            with lock:
                spoken = normalize(glued)
        except Exception as exc:  # the grammar's own failure: speak what the glue made of it
            log.warning("text normalisation failed (%s: %s); speaking the text as written", type(exc).__name__, exc)
            return glued
        return spoken or glued


def lang_for(script: str | None, voice_language: str) -> Lang | None:
    """Which grammar a piece gets: Chinese for Han text, English for Latin text read by an English
    voice; None (left as written) for anything else."""
    if script == "zh":
        return "zh"
    if script is None and voice_language.lower().startswith("en"):
        return "en"
    return None
