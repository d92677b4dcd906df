"""How well planted defects rank settings: `--setting auto`'s choice on a data set, and each
candidate's planted-defect results beside its results on the set's real defects.

Every candidate is fitted once, as `auto` fits it (on part of the normal training images), then
scored on the planted defects (what `auto` sees) and on every n-th real test image (what it
cannot see). With `--shots K`, the first K training images are few-shot references: `auto`
leaves them out in turn, and each candidate's real results are those of its few-shot fit on
all K. Prints a table, the rank correlation of planted with real image AUROC and of the two
objectives across the candidates, and writes JSON.

    python benchmarks/selection.py ../shared/data/mtd/magnetic_tile --test-every 4
    python benchmarks/selection.py ../shared/data/deeppcb/pcb --test-every 5
    python benchmarks/selection.py ../shared/data/deeppcb/pcb --shots 4 --test-every 20
"""

from __future__ import annotations

import time

import numpy as np
from common import subsample_arguments, write_json
from scipy.stats import spearmanr
from speed import cpu_description

from normalcy import Detector
from normalcy.backbones.memo import ForwardMemo
from normalcy.datasets import find_categories, load_mask
from normalcy.metrics import aupro, image_auroc
from normalcy.selection import CANDIDATES, select_setting
from normalcy.setting import SETTINGS, Setting

CANDIDATE_SETTINGS = {name: SETTINGS[name] for name in CANDIDATES}


def main() -> None:
    args = subsample_arguments(
        __doc__,
        "selection.json",
        lambda parser: parser.add_argument("--shots", type=int, help="few-shot references"),
    )
    category = find_categories(args.data)[0]
    normal = category.train[:: args.train_every][: args.shots]
    tests = category.test[:: args.test_every]
    fitted: dict[Setting, Detector] = {}  # each candidate's last fit
    memo = ForwardMemo()  # shared as `auto` shares it

    def make(setting: Setting, **changes: object) -> Detector:
        fitted[setting] = Detector(setting, **changes)
        fitted[setting].backbone_model().memo = memo
        return fitted[setting]

    start = time.perf_counter()
    chosen = select_setting(
        normal, make, CANDIDATE_SETTINGS, progress=True, memo=memo, few_shot=bool(args.shots)
    )
    seconds = time.perf_counter() - start
    rows = []
    for trial in chosen.trials:
        setting = CANDIDATE_SETTINGS[trial.name]
        if args.shots:  # the few-shot model the user would get: on all references
            make(setting, shots=args.shots).fit(normal, calibrate=False)
        detector = fitted[setting]
        detector.backbone_model().memo = None  # the real test images are scored afresh
        predictions = detector.predict([s.path for s in tests])
        labels = [s.label for s in tests]
        maps = [p.anomaly_map for p in predictions]
        masks = [
            load_mask(s.mask_path, m.shape) if s.mask_path else np.zeros(m.shape, dtype=bool)
            for s, m in zip(tests, maps, strict=True)
        ]
        rows.append(
            {
                **trial.__dict__,
                "objective": trial.objective,
                "real_image_auroc": image_auroc(labels, [p.score for p in predictions]),
                "real_aupro": aupro(masks, maps),
            }
        )
    real_objective = [(r["real_image_auroc"] + r["real_aupro"]) / 2 for r in rows]
    summary = {
        "data": str(args.data),
        "cpu": cpu_description(),
        "normal_images": len(normal),
        "shots": args.shots,
        "test_images": len(tests),
        "selection_seconds": seconds,
        "chosen": chosen.chosen,
        "best_real": rows[int(np.argmax(real_objective))]["name"],
        "rank_correlation_image_auroc": spearmanr(
            [r["image_auroc"] for r in rows], [r["real_image_auroc"] for r in rows]
        ).statistic,
        "rank_correlation_objective": spearmanr(
            [r["objective"] for r in rows], real_objective
        ).statistic,
        "trials": rows,
    }
    print("| setting | planted AUROC | planted AUPRO | real AUROC | real AUPRO | ms/img | fit s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (chosen)" if r["name"] == chosen.chosen else ""
        print(
            f"| {r['name']}{mark} | {r['image_auroc']:.3f} | {r['aupro']:.3f} | "
            f"{r['real_image_auroc']:.3f} | {r['real_aupro']:.3f} | {r['ms_per_image']:.0f} | "
            f"{r['fit_seconds']:.0f} |"
        )
    print(
        f"selection {seconds:.0f} s; rank correlation planted/real: image AUROC "
        f"{summary['rank_correlation_image_auroc']:.2f}, objective "
        f"{summary['rank_correlation_objective']:.2f}; best on real defects: "
        f"{summary['best_real']}"
    )
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
