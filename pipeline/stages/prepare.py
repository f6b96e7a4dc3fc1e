"""prepare: get the images, check them, split them, describe them.

Reads params: seed, data. Writes data/prepared/ (uint8 splits, class names, train mean/std),
metrics/data.json (counts per class and split) and plots/prepare/samples.png.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import plots
from pipeline.atomic import atomic_set, write_json
from pipeline.data import sources
from pipeline.data.prepared import PREPARED_DIR, build_prepared, class_counts
from pipeline.deps import check_outputs_writable
from pipeline.errors import PipelineError, stage_main
from pipeline.params import Params, load


def run(p: Params) -> dict:
    """Load `data.source`, check and split it; write data/prepared/, metrics/data.json and the sample grid."""
    d = p.data
    print(f"prepare: source={d.source} image_size={d.image_size} channels={d.channels}", flush=True)
    raw = sources.load(d)
    for path in raw.skipped:
        print(f"prepare: skipped unreadable image {path}", flush=True)
    if d.split == "official" and raw.official_test is None:
        raise PipelineError(f"data.split=official: data.source={d.source} has no official test split "
                            "(use random or auto)")
    official = raw.official_test if d.split != "random" else None
    data = build_prepared(raw.images, raw.labels, raw.class_names, (d.ratios.train, d.ratios.val, d.ratios.test),
                          p.seed, d.min_per_class, d.max_per_class, official)
    data.source = f"folder:{d.raw_dir}" if d.source == "folder" else d.source
    counts = class_counts(data)
    summary = {
        "source": d.source, "split": "official" if official is not None else "random",
        "num_classes": data.num_classes, "image_size": data.image_size,
        "channels": data.channels, "skipped_files": len(raw.skipped),
        "total": {s: int(len(data.y[s])) for s in counts}, "per_class": counts,
        "mean": data.mean, "std": data.std,
    }
    with atomic_set() as stage:  # the data, its figure and its metrics as one set
        data.save(stage(PREPARED_DIR, folder=True))
        plots.sample_grid(data.x["train"], data.y["train"], data.class_names, d.sample_grid,
                          stage(Path("plots/prepare/samples.png")))
        write_json(stage("metrics/data.json"), summary)
    sizes = ", ".join(f"{s} {len(data.y[s])}" for s in counts)
    print(f"prepare: {data.num_classes} classes, {sizes}; mean {data.mean} std {data.std}", flush=True)
    return summary


@stage_main
def main() -> None:
    p = load()
    check_outputs_writable("prepare")
    run(p)


if __name__ == "__main__":
    main()
