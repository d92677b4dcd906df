"""Zero-shot scoring of a set of unlabelled images against each other (method "mutual").

Without normal references there is no false-positive rate to set a threshold from, so
decisions are made only with a user threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tqdm import tqdm

from normalcy.data import ImageInput, ImageLoadError
from normalcy.inputs import LoadedImage, decoded_ahead, expand_inputs
from normalcy.methods.mutual import MutualScorer, content_key
from normalcy.pipeline import feature_grids
from normalcy.prediction import Prediction

if TYPE_CHECKING:
    from normalcy.detector import Detector

log = logging.getLogger("normalcy")


def zero_shot(
    detector: Detector, inputs: ImageInput | Sequence[ImageInput]
) -> list[Prediction | ImageLoadError]:
    """One result per input, in order, each image scored against the others by the
    detector's mutual scorer; unreadable inputs give their error instead."""
    method = detector.active_setting.method
    if method != MutualScorer.name:
        raise ValueError(f"zero-shot scoring uses method {MutualScorer.name!r}, not {method!r}")
    sources = expand_inputs(inputs)
    results: list[Prediction | ImageLoadError | None] = []
    readable: list[tuple[int, str, tuple[int, int]]] = []
    scorer = detector.mutual_scorer()
    # Sets larger than one sub-batch are split by the decoded pixels' content.
    keys: list[bytes] | None = [] if len(sources) > scorer.max_peers else None
    bar = tqdm(total=len(sources), desc="features", unit="img", disable=not detector.progress)

    def decoded() -> Iterator[LoadedImage]:
        """The readable images, their places noted; errors kept in their places."""
        for item in decoded_ahead(sources, detector.decode_side):
            bar.update()
            if isinstance(item, ImageLoadError):
                log.warning("skipped %s", item)
                results.append(item)
                continue
            readable.append((len(results), item.name, item.size))
            if keys is not None:
                keys.append(content_key(item.image))
            results.append(None)
            yield item

    backbone = detector.backbone_model()
    grids = [
        grid
        for _, window in feature_grids(backbone, decoded(), detector.batch_size)
        for grid in window
    ]
    bar.close()
    blocks = scorer.n_blocks(grids, keys)
    bar = tqdm(total=blocks, desc="mutual", unit="block", disable=not detector.progress)
    scores = scorer.score_batch(grids, on_block=bar.update, keys=keys)
    bar.close()
    detector.threshold_ = detector.threshold
    pipeline = detector.pipeline(scorer, dense=False)
    for (position, name, size), grid_scores in zip(readable, scores, strict=True):
        results[position] = pipeline.prediction(name, size, grid_scores)
    return results  # type: ignore[return-value]
