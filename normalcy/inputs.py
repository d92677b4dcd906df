"""Which images a call names (files, folders, arrays, PIL images), and decoding them ahead of
the network in threads, each bad image reported in its place."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from normalcy.data import MAX_PIXELS, ImageInput, ImageLoadError, load_named

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File extensions treated as images when listing folders (compared in lower case)."""


def source_name(source: ImageInput, index: int) -> str:
    """Name an input for reports: the path for files, ``<image INDEX>`` for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return f"<image {index}>"


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """One successfully loaded image, the name to report it under and its original size.

    ``size`` is the (height, width) of the image before any reduction (see ``min_side`` in
    :func:`load_image`), the size at which full-resolution maps are drawn; it defaults to the
    size of ``image``.
    """

    name: str
    image: np.ndarray
    size: tuple[int, int] = None  # type: ignore[assignment]  # set by __post_init__

    def __post_init__(self) -> None:
        if self.size is None:
            height, width = self.image.shape[:2]
            object.__setattr__(self, "size", (height, width))


def load_many(
    sources: Sequence[ImageInput], max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> Iterator[LoadedImage | ImageLoadError]:
    """Load images one at a time, in order, yielding either the image or its error.

    A bad image is yielded as its :class:`ImageLoadError` (never raised, never dropped) so the
    caller can report it and go on with the rest. ``min_side`` reduces large images as in
    :func:`load_image`; each :class:`LoadedImage` keeps its original size.
    """
    for index, source in enumerate(sources):
        yield load_one(source, index, max_pixels, min_side)


def load_one(
    source: ImageInput, index: int, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> LoadedImage | ImageLoadError:
    """The `index`-th input of a batch, loaded as in :func:`load_many`: the image or its error."""
    name = source_name(source, index)
    try:
        image, size = load_named(source, name, max_pixels, min_side)
        return LoadedImage(name=name, image=image, size=size)
    except ImageLoadError as err:
        return err


PREFETCH = 4  # decoded images kept ready ahead of the consumer, per decoding thread


def decode_threads() -> int:
    """Threads that decode ahead of the network: a quarter of the cores, at least one (the
    network keeps the others); enough to keep a GPU fed from a many-core host."""
    return max(1, (os.cpu_count() or 1) // 4)


def decoded_ahead(
    sources: Sequence[ImageInput], min_side: int | None, threads: int | None = None
) -> Iterator[LoadedImage | ImageLoadError]:
    """`load_many(sources, min_side=...)`, in order, decoded by `threads` threads (default
    `decode_threads()`) up to `PREFETCH` images each ahead of the consumer, so decoding
    overlaps the forward pass (decoders and the network's engine release the GIL); an image
    that cannot be read comes as its error, in its place. Abandoning the stream cancels the
    rest."""
    threads = threads or decode_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="normalcy-decode") as pool:
        pending: deque[Future] = deque()
        try:
            for index, source in enumerate(sources):
                pending.append(pool.submit(load_one, source, index, MAX_PIXELS, min_side))
                if len(pending) >= threads * PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _is_image_file_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """List the image files in a folder by extension, sorted by path.

    Hidden files and hidden folders (names starting with ".") are skipped.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if not recursive:
        return sorted(p for p in root.iterdir() if p.is_file() and _is_image_file_name(p.name))
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if _is_image_file_name(f))
    return sorted(found)


def is_single_input(inputs: ImageInput | Sequence[ImageInput]) -> bool:
    """Whether `inputs` is one image (not a list, a 4-D array or a folder): `predict` then
    returns one prediction instead of a list."""
    return (
        not isinstance(inputs, (list, tuple))
        and not (isinstance(inputs, np.ndarray) and inputs.ndim == 4)
        and not (isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir())
    )


def expand_inputs(inputs: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """Flatten user inputs into a list of single images.

    Accepts one input or a sequence of them. Folders expand to the images they hold, a 4-D
    array (N, H, W, C) to its N images; files, other arrays and PIL images pass through, and so
    does a path that does not exist, so that loading it reports the problem.
    """
    if isinstance(inputs, (str, os.PathLike, np.ndarray, Image.Image)):
        items: Sequence[ImageInput] = [inputs]
    elif isinstance(inputs, Sequence):
        items = inputs
    else:
        raise TypeError(
            f"unsupported input type {type(inputs).__name__}; expected a path, an array, "
            "a PIL image or a sequence of them"
        )
    expanded: list[ImageInput] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            images = list_images(item)
            if not images:
                extensions = " ".join(sorted(IMAGE_EXTENSIONS))
                raise ValueError(
                    f"{os.fsdecode(item)}: folder holds no images (looked for {extensions})"
                )
            expanded.extend(images)
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            expanded.extend(item)
        else:
            expanded.append(item)
    return expanded
