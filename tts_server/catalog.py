"""piper's voice catalogue: listing it and downloading voices into `VOICES_DIR`.

The catalogue is piper's own `voices.json` (as published with the voices), read from
`VOICES_BASE_URL`: the voices' home on Hugging Face by default, or an internal mirror of it (the
same files under the same paths), which is what on-prem sites without internet use. Each voice is
a `NAME.onnx` model and its `NAME.onnx.json` config; both are checked against the catalogue's
size and MD5 before they become a voice. A download goes to `.part` files first and the config is
moved into place before the model, so `VOICES_DIR` never holds a partial voice: the server loads
only a `.onnx` that has its `.onnx.json` (a failed or interrupted download leaves, at most, a
`.part` file, which the next attempt replaces).

Runs from the CLI (`trtc-backend voices ...`), never at run time: the server only loads what is
on disk.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

DEFAULT_BASE_URL = "https://huggingface.co/rhasspy/piper-voices/resolve/main"
_CHUNK = 1 << 16


class CatalogError(Exception):
    """A catalogue or download problem, said in one line."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the base URL
    size: int
    md5: str


@dataclass(frozen=True)
class RemoteVoice:
    name: str
    language: str
    quality: str
    model: RemoteFile
    config: RemoteFile

    @property
    def size(self) -> int:
        return self.model.size + self.config.size


# What a catalogue may name: a voice is a file name in VOICES_DIR, so no path separator and no
# leading dot ("..", hidden files); a file is a path under the base URL, without ".." segments.
_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_FILE_PATH = re.compile(r"[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*")
_MD5 = re.compile(r"[0-9a-f]{32}")
# piper's largest voices are about 120 MB: a catalogue claiming more is not describing a voice.
MAX_VOICE_FILE_BYTES = 1 << 30


def fetch_catalog(base_url: str, client: httpx.Client) -> dict[str, RemoteVoice]:
    """The catalogue's voices; entries that are not a voice this server could load safely (a name
    that is not a plain file name, a file path leaving the base URL, sizes or sums that are not
    numbers) are left out."""
    url = f"{base_url.rstrip('/')}/voices.json"
    try:
        response = client.get(url)
        response.raise_for_status()
        entries = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise CatalogError(f"could not read the voice catalogue at {url}: {exc}") from exc
    if not isinstance(entries, dict):
        raise CatalogError(f"the voice catalogue at {url} is not a JSON object of voices")
    voices = {}
    for name, entry in entries.items():
        try:
            voices[name] = _voice(name, entry)
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration):
            continue
    return voices


def _voice(name: str, entry: dict[str, Any]) -> RemoteVoice:
    if not _VOICE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"unsafe voice name {name!r}")
    files = entry["files"]

    def find(suffix: str) -> RemoteFile:
        path = next(p for p in files if isinstance(p, str) and p.endswith(suffix))
        size, md5 = int(files[path]["size_bytes"]), str(files[path]["md5_digest"]).lower()
        if not _FILE_PATH.fullmatch(path) or ".." in path.split("/"):
            raise ValueError(f"unsafe file path {path!r}")
        if not 0 < size <= MAX_VOICE_FILE_BYTES or not _MD5.fullmatch(md5):
            raise ValueError(f"implausible size or MD5 for {path!r}")
        return RemoteFile(path, size, md5)

    language = entry.get("language", {})
    return RemoteVoice(
        name=name,
        language=str(language.get("code", "")) if isinstance(language, dict) else str(language),
        quality=str(entry.get("quality", "")),
        model=find(".onnx"),
        config=find(".onnx.json"),
    )


def download(
    voice: RemoteVoice, base_url: str, voices_dir: Path, client: httpx.Client,
    progress: Callable[[str], None] = lambda _line: None,
) -> Path:
    """Fetch and verify a voice into `voices_dir`; returns the model's path."""
    voices_dir.mkdir(parents=True, exist_ok=True)
    model = voices_dir / f"{voice.name}.onnx"
    config = voices_dir / f"{voice.name}.onnx.json"
    for target in (model, config):
        # Names are checked when the catalogue is read; this holds whatever a caller passes.
        if target.resolve().parent != voices_dir.resolve():
            raise CatalogError(f"voice name {voice.name!r} would be written outside {voices_dir}; nothing installed")
    parts = []
    try:
        for remote, target in ((voice.config, config), (voice.model, model)):
            part = target.with_name(f".{target.name}.part")
            parts.append(part)
            _fetch(f"{base_url.rstrip('/')}/{remote.path}", remote, part, client)
            progress(f"{target.name}: {remote.size:,} bytes, MD5 ok")
        # The config first: a model without its config is not loaded, so the voice appears
        # only with its last rename.
        parts[0].replace(config)
        parts[1].replace(model)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    return model


def _fetch(url: str, remote: RemoteFile, part: Path, client: httpx.Client) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with client.stream("GET", url) as response, part.open("wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes(_CHUNK):
                size += len(chunk)
                if size > remote.size:
                    break  # more than the catalogue says: refused below, without reading the rest
                out.write(chunk)
                digest.update(chunk)
    except httpx.HTTPError as exc:
        raise CatalogError(f"could not download {url}: {exc}") from exc
    if size != remote.size:
        got = f"more than {remote.size:,}" if size > remote.size else f"{size:,}"
        raise CatalogError(f"{url}: got {got} bytes, the catalogue says {remote.size:,}; nothing installed")
    if digest.hexdigest() != remote.md5:
        raise CatalogError(f"{url}: MD5 {digest.hexdigest()} does not match the catalogue's {remote.md5}; nothing installed")
