"""A budget of decoded pixels in flight across the service, so memory stays bounded whatever
the uploads: a decode waits until its image's pixels fit, and the smallest waiting image goes
first, so a flood of huge images cannot starve the ordinary ones."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import io
import itertools
from collections.abc import AsyncIterator

from PIL import Image, UnidentifiedImageError

from normalcy.data import header_size


class PixelBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the pixel budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` of the budget (at most all of it) for the duration of the block."""
        pixels = max(0, min(pixels, self.limit))
        if not self._waiting and self.used + pixels <= self.limit:
            self.used += pixels
        else:
            granted = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (pixels, next(self._order), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # granted, then cancelled
                    self._release(pixels)
                raise
        try:
            yield
        finally:
            self._release(pixels)

    def _release(self, pixels: int) -> None:
        self.used -= pixels
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            pixels, _, granted = heapq.heappop(self._waiting)
            if not granted.cancelled():
                self.used += pixels
                granted.set_result(None)


def header_pixels(data: bytes) -> int:
    """Width x height from an encoded image's header, nothing decoded; 0 if unreadable (the
    decode that follows names the problem)."""
    try:
        height, width = header_size(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return 0
    return height * width
