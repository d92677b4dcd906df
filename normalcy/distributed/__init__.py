"""normalcy on Ray: fit from shards, and score at any scale with actors that each load the
model once, results streamed to Parquet files as the job goes, resumable after a crash.

    normalcy fit NORMAL_DIR -o MODEL --ray [ADDRESS]
    normalcy predict MODEL INPUT... -o OUT --ray [ADDRESS]

Ray Data spreads the image paths over a pool of actors (one per GPU when the cluster has
GPUs, else CPU actors), each holding one `Detector`. The driver only keeps paths and writes
each finished share of rows to `OUT/results-<run>-<n>.parquet` atomically, so an image counts
as done once its row is in a complete file; a rerun with the same OUT skips those. Actors
that die are restarted and their batches retried by Ray. Inputs must be paths every worker
can read (a shared filesystem), and `--maps` files are written by the actors under OUT/maps.
"""

from normalcy.distributed.cluster import RAY_MISSING, connect, require_ray
from normalcy.distributed.fit import fit
from normalcy.distributed.predict import predict
from normalcy.distributed.results import RESULT_GLOB, PredictSummary, read_results
from normalcy.distributed.zero_shot import zero_shot

__all__ = [
    "RAY_MISSING",
    "RESULT_GLOB",
    "PredictSummary",
    "connect",
    "fit",
    "predict",
    "read_results",
    "require_ray",
    "zero_shot",
]
