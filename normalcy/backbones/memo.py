"""A bounded store of backbone outputs by input content, so that work that shows a network
the same input twice pays for one pass.

Where that happens: a fit scores its own images again for the threshold; the settings that
`auto` compares share a network (the two EfficientNet-Lite0 settings) and the images they are
tried on; a planted defect changes a few tiles of an image whose other tiles were computed
already. Inputs are keyed by a digest of their values, so a hit is the same input exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Hashable, Iterator

import torch


def memo_bytes() -> int:
    """Bytes of outputs a memo keeps at most: 1 GiB, or a sixteenth of the machine's memory
    where that is less. Once full, a memo keeps what it holds and stores no more: a fit that
    streams thousands of images then still reuses its first ones, where evicting the oldest
    would drop each just before its second use."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported here
        physical = 16 << 30
    return min(1 << 30, physical // 16)


class ForwardMemo:
    """Outputs of one network per (network identity, input digest, layer); bounded by
    `max_bytes`. A memo serves backbones built from one source of weights."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = memo_bytes() if max_bytes is None else max_bytes
        self.bytes = 0
        self.reading = True
        self.hits = 0
        self._outputs: dict[Hashable, torch.Tensor] = {}

    def __len__(self) -> int:
        """Outputs held (one per input and layer)."""
        return len(self._outputs)

    @staticmethod
    def digest(item: torch.Tensor) -> bytes:
        """A digest of one input's values and shape."""
        values = item.detach().contiguous().cpu()
        data = hashlib.sha256(values.numpy().tobytes())  # hardware-accelerated on most CPUs
        data.update(str(tuple(values.shape)).encode())
        return data.digest()

    def get(self, key: Hashable) -> torch.Tensor | None:
        if not self.reading:
            return None
        found = self._outputs.get(key)
        self.hits += found is not None
        return found

    def put(self, key: Hashable, output: torch.Tensor) -> None:
        size = output.numel() * output.element_size()
        if key not in self._outputs and self.bytes + size <= self.max_bytes:
            self._outputs[key] = output.clone()
            self.bytes += size

    @contextlib.contextmanager
    def attached(self, backbone: torch.nn.Module) -> Iterator[None]:
        """`backbone` uses this memo within the block (unless it has one already)."""
        if getattr(backbone, "memo", None) is not None:
            yield
            return
        backbone.memo = self
        try:
            yield
        finally:
            backbone.memo = None

    @contextlib.contextmanager
    def writing_only(self) -> Iterator[None]:
        """Within the block every input is computed (and stored), none read: for timing."""
        reading, self.reading = self.reading, False
        try:
            yield
        finally:
            self.reading = reading
