"""Zero-shot mutual scoring (MuSc-style): the images of an unlabelled batch score each other.

Defects are rare and differ from image to image, while normal texture recurs in almost every
image. So a patch is scored by its distances to the nearest patches of each other image, and
only the smallest share of those distances counts: a defect that a few other images share
cannot vouch for itself. Optionally (MuSc), scores are averaged over several neighbourhood
sizes, for large defects as well as small ones, and image scores are smoothed over each
image's most similar images.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from normalcy.backbones import resolve_precision
from normalcy.methods.base import GridScores, NotExportable, as_grid, exact_dtype
from normalcy.postprocess import SIGMA_AT_256, ranking_score

# Fewer images than this make "what most images look like" meaningless...
MIN_BATCH = 3
# ...and below this many, a few unusual normal images already look like defects.
RELIABLE_BATCH = 20
# Size of one block of the pairwise patch-distance computation (patches per side).
BLOCK_PATCHES = 8192
# A larger batch is split into sub-batches of at most this many images: the distance tables
# grow with the square of the batch, and 200 peers are ample for the smallest 30% to vouch.
MAX_PEERS = 200

log = logging.getLogger("normalcy")


def neighbourhood_features(grid: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(h*w, C) patch features averaged over `size` x `size` neighbourhoods, L2-normalised."""
    tensor = as_grid(grid).permute(2, 0, 1)
    if size > 1:
        tensor = F.avg_pool2d(
            tensor[None], size, stride=1, padding=size // 2, count_include_pad=False
        )[0]
    return F.normalize(tensor.flatten(1).T, dim=1)


def _blocks(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive image indices grouped so each group has about `limit` patches at most."""
    groups: list[list[int]] = [[]]
    total = 0
    for index, length in enumerate(lengths):
        if groups[-1] and total + length > limit:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += length
    return groups


def nearest_distances(
    patches: Sequence[torch.Tensor],
    block_patches: int = BLOCK_PATCHES,
    on_block: Callable[[], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """For every image i, an (n_i, N) table: distance of each of its unit-length patches to
    the nearest patch of image j (infinite for j = i).

    For unit vectors the squared distance is 2 - 2 x cosine similarity, so each block is one
    matrix product and nearest means most similar. Blocks run over pairs of image groups, each
    block once: its row maxima and column maxima serve both sides. `dtype` is the arithmetic
    of the products: bfloat16 halves their time where the CPU has bfloat16 instructions, and
    its rounding (about 0.01 in distance) matters only for near-twin patches, far closer than
    real images' nearest patches (measured: the same image AUROC on Magnetic Tile).
    """
    count = len(patches)
    lengths = [len(p) for p in patches]
    device = patches[0].device
    # best similarity so far
    tables = [torch.full((n, count), -math.inf, device=device) for n in lengths]
    groups = _blocks(lengths, block_patches)
    stacked = [torch.cat([patches[i] for i in g]).to(dtype) for g in groups]
    offsets = [np.cumsum([0] + [lengths[i] for i in g]) for g in groups]
    for a, group_a in enumerate(groups):
        for b in range(a, len(groups)):
            group_b = groups[b]
            similarity = stacked[a] @ stacked[b].T
            for col, j in enumerate(group_b):
                lo, hi = offsets[b][col], offsets[b][col + 1]
                nearest_in_j = similarity[:, lo:hi].amax(dim=1)
                for row, i in enumerate(group_a):
                    if i != j:
                        tables[i][:, j] = nearest_in_j[offsets[a][row] : offsets[a][row + 1]]
            if b != a:
                for row, i in enumerate(group_a):
                    lo, hi = offsets[a][row], offsets[a][row + 1]
                    nearest_in_i = similarity[lo:hi].amax(dim=0)
                    for col, j in enumerate(group_b):
                        tables[j][:, i] = nearest_in_i[offsets[b][col] : offsets[b][col + 1]]
            if on_block is not None:
                on_block()
    # -inf similarity (an image with itself) becomes an infinite distance
    return [t.mul_(-2).add_(2).clamp_(min=0).sqrt_() for t in tables]


def content_key(array: np.ndarray | torch.Tensor) -> bytes:
    """A digest of an array's values: what `sub_batches` orders images by."""
    values = array.cpu().numpy() if isinstance(array, torch.Tensor) else array
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes()).digest()


def sub_batches(keys: Sequence[bytes], max_peers: int) -> list[list[int]]:
    """Indices of a batch of images with these content keys (`content_key` of each image's
    pixels or grid) dealt into the fewest sub-batches of at most `max_peers` images, in the
    keys' order: each sub-batch is a spread sample of the batch, and the split does not
    depend on the order the images came in, nor on where their features are computed."""
    parts = math.ceil(len(keys) / max_peers)
    if parts <= 1:
        return [list(range(len(keys)))]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return [sorted(order[p::parts]) for p in range(parts)]


def mean_of_smallest(table: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the mean of the smallest `fraction` of its finite entries (at least one)."""
    others = table.shape[1] - 1
    k = max(1, round(fraction * others))
    return torch.topk(table, k, dim=1, largest=False).values.mean(dim=1)


def rescore(scores: np.ndarray, global_features: np.ndarray, neighbours: int) -> np.ndarray:
    """Each image score averaged with those of its `neighbours` most similar images (cosine
    similarity of global features): an isolated high score among look-alikes is damped."""
    if neighbours < 1 or len(scores) < 2:
        return np.asarray(scores, dtype=np.float64)
    feats = global_features / np.linalg.norm(global_features, axis=1, keepdims=True)
    similarity = feats @ feats.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(neighbours, len(scores) - 1)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    scores = np.asarray(scores, dtype=np.float64)
    return (scores + scores[nearest].mean(axis=1)) / 2


class MutualScorer:
    """Scores a batch of images against each other; needs no normal references.

    neighbourhoods: patch-aggregation sizes whose score maps are averaged.
    vouch_fraction: share of the other images whose nearest-patch distances are averaged.
    rescore_neighbours: image scores are averaged with this many most similar images' (0: off).
    max_peers: a larger batch is split into sub-batches of at most this many images, each
        scored on its own, so memory and time per image stay bounded.
    precision: arithmetic of the distance products: "float32", "bfloat16" (twice as fast
        where the CPU has bfloat16 instructions) or "auto" (bfloat16 only there).
    sigma: the map smoothing (as `Detector`'s) of the image scores that re-scoring smooths.

    Defaults: 1x1 patches and no re-scoring. On Magnetic Tile at 448 px the 3x3 and 5x5
    neighbourhoods and re-scoring each lowered image AUROC (by 0.03, and by 0.04-0.06) and
    the 3x3/5x5 maps lowered AUPRO, at three times the time; `(1, 3, 5)` and 8 are MuSc's
    settings.
    """

    name = "mutual"
    leaves_out = False  # nothing is fitted

    def __init__(
        self,
        neighbourhoods: Sequence[int] = (1,),
        vouch_fraction: float = 0.3,
        rescore_neighbours: int = 0,
        max_peers: int = MAX_PEERS,
        precision: str = "auto",
        block_patches: int = BLOCK_PATCHES,
        sigma: float = SIGMA_AT_256,
    ) -> None:
        if not 0 < vouch_fraction <= 1:
            raise ValueError(f"vouch_fraction must be in (0, 1], got {vouch_fraction}")
        if not neighbourhoods or any(n < 1 or n % 2 == 0 for n in neighbourhoods):
            raise ValueError(f"neighbourhoods must be odd sizes >= 1, got {neighbourhoods}")
        if rescore_neighbours < 0:
            raise ValueError(f"rescore_neighbours must be >= 0 (0: off), got {rescore_neighbours}")
        if max_peers < MIN_BATCH:
            raise ValueError(f"max_peers must be at least {MIN_BATCH}, got {max_peers}")
        resolve_precision(precision)
        self.neighbourhoods = tuple(neighbourhoods)
        self.vouch_fraction = vouch_fraction
        self.rescore_neighbours = rescore_neighbours
        self.max_peers = max_peers
        self.precision = precision
        self.block_patches = block_patches
        self.sigma = sigma

    def get_params(self) -> dict[str, Any]:
        return {
            "neighbourhoods": list(self.neighbourhoods),
            "vouch_fraction": self.vouch_fraction,
            "rescore_neighbours": self.rescore_neighbours,
            "max_peers": self.max_peers,
            "precision": self.precision,
            "sigma": self.sigma,
        }

    def n_blocks(self, grids: Sequence[np.ndarray], keys: Sequence[bytes] | None = None) -> int:
        """How many distance blocks `score_batch` computes (for progress bars)."""
        total = 0
        for members in self.split(grids, keys):
            lengths = [grids[i].shape[0] * grids[i].shape[1] for i in members]
            groups = len(_blocks(lengths, self.block_patches))
            total += groups * (groups + 1) // 2
        return len(self.neighbourhoods) * total

    def fit(self, grids: Iterable[torch.Tensor]) -> MutualScorer:
        raise ValueError(
            "the mutual method is zero-shot: it needs no fit; call zero_shot(images) "
            "(CLI: normalcy predict --zero-shot INPUT_DIR -o OUT)"
        )

    def score_held_out(self, grids: Iterable[torch.Tensor]) -> list[GridScores]:
        return self.score_batch(list(grids))

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def export_module(self) -> torch.nn.Module:
        raise NotExportable(
            "zero-shot mutual scoring has no fitted state: it scores each image against the "
            "others of its batch, so its result depends on the batch, not on one image; fit "
            "a model on normal images (patchknn, gaussian, golden) and export that"
        )

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> MutualScorer:
        return cls(**params)

    @property
    def n_features_in_(self) -> None:
        """Any: a batch is scored against itself."""
        return None

    def split(
        self, grids: Sequence[np.ndarray | torch.Tensor], keys: Sequence[bytes] | None = None
    ) -> list[list[int]]:
        """The sub-batches the batch is scored in (`sub_batches`), by the images' content keys
        (default: their grids')."""
        if len(grids) <= self.max_peers:  # one sub-batch: no keys to compute
            return [list(range(len(grids)))]
        keys = [content_key(g) for g in grids] if keys is None else keys
        return sub_batches(keys, self.max_peers)

    def score_batch(
        self,
        grids: Sequence[torch.Tensor],
        on_block: Callable[[], None] | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> list[GridScores]:
        """The batch scored against itself (in sub-batches, see `split`); with re-scoring,
        image scores smoothed over similar images."""
        patches = self.patch_scores(grids, on_block, keys)
        if not self.rescore_neighbours:
            return [GridScores(p) for p in patches]
        ranked = np.array([ranking_score(p, self.sigma) for p in patches])
        images = self.rescore(ranked, grids)
        return [GridScores(p, image=float(i)) for p, i in zip(patches, images, strict=True)]

    @torch.inference_mode()
    def patch_scores(
        self,
        grids: Sequence[np.ndarray | torch.Tensor],
        on_block: Callable[[], None] | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> list[torch.Tensor]:
        """Patch anomaly scores (h, w) for each (h, w, C) grid of the batch."""
        if len(grids) < MIN_BATCH:
            raise ValueError(
                f"zero-shot scoring compares the images of a batch with each other and needs "
                f"at least {MIN_BATCH} images, got {len(grids)}; dozens or more make it reliable"
            )
        if len(grids) < RELIABLE_BATCH:
            log.warning(
                "zero-shot scoring of only %d images: scores are unreliable below about %d, "
                "since each image is judged by what the others look like",
                len(grids),
                RELIABLE_BATCH,
            )
        grids = [as_grid(g) for g in grids]
        precision = resolve_precision(self.precision, grids[0].device)
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        total = [
            torch.zeros(g.shape[:2], dtype=exact_dtype(g.device), device=g.device) for g in grids
        ]
        for members in self.split(grids, keys):
            for size in self.neighbourhoods:
                patches = [neighbourhood_features(grids[i], size) for i in members]
                tables = nearest_distances(patches, self.block_patches, on_block, dtype)
                for i, table in zip(members, tables, strict=True):
                    smallest = mean_of_smallest(table, self.vouch_fraction)
                    total[i] += smallest.reshape(grids[i].shape[:2])
        return [(acc / len(self.neighbourhoods)).float() for acc in total]

    def rescore(self, scores: np.ndarray, grids: Sequence[torch.Tensor]) -> np.ndarray:
        """Image scores smoothed over similar images (global feature: the grid's mean)."""
        global_features = np.stack(
            [as_grid(g).reshape(-1, g.shape[-1]).mean(dim=0).cpu().numpy() for g in grids]
        )
        return rescore(scores, global_features, self.rescore_neighbours)
