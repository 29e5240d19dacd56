"""Recent responses in memory, by (voice, text, rate, channels, format): the welcome line and
other repeated phrases come back at once, and so does a retried request."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class AudioCache:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._size = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        audio = self._items.get(key)
        if audio is not None:
            self._items.move_to_end(key)
        return audio

    def put(self, key: Hashable, audio: bytes) -> None:
        if len(audio) > self._max_bytes // 4:
            return  # one long text must not push out every short phrase
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old)
        self._items[key] = audio
        self._size += len(audio)
        while self._size > self._max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._size -= len(dropped)
