"""prepare: get the images, check them, split them, describe them (one task: `--task digits|photos`).

Reads params: seed and the task's data section (data | photos). Writes the task's prepared data
(data/prepared/ | data/prepared_photos/: uint8 splits, class names, train mean/std), its metrics
(metrics/data.json | metrics/data_photos.json: counts per class and split, the source's details) and its sample
grid (plots/prepare/samples.png | samples_photos.png).
"""

from __future__ import annotations

import sys

from pipeline import plots, tasks
from pipeline.atomic import atomic_set, write_json
from pipeline.data import sources
from pipeline.data.prepared import build_prepared, class_counts
from pipeline.errors import PipelineError, stage_main
from pipeline.outputs import check_writable
from pipeline.params import Params, load


def run(p: Params, task: tasks.Task = tasks.TASKS["digits"]) -> dict:
    """Load the task's source, check and split it; write its prepared data, metrics and sample grid."""
    d = task.section(p, "data")
    print(f"prepare: {task.name}: source={d.source} image_size={d.image_size} channels={d.channels}", flush=True)
    raw = sources.load(d)
    for path in raw.skipped:
        print(f"prepare: skipped unreadable image {path}", flush=True)
    if d.split == "official" and raw.official_test is None:
        raise PipelineError(f"{task.data}.split=official: {task.data}.source={d.source} has no official test split "
                            "(use random or auto)")
    official = raw.official_test if d.split != "random" else None
    data = build_prepared(raw.images, raw.labels, raw.class_names, (d.ratios.train, d.ratios.val, d.ratios.test),
                          p.seed, d.min_per_class, d.max_per_class, official)
    data.source = f"folder:{d.raw_dir}" if d.source == "folder" else d.source
    counts = class_counts(data)
    summary = {
        "task": task.name, "source": d.source, "split": "official" if official is not None else "random",
        "num_classes": data.num_classes, "image_size": data.image_size,
        "channels": data.channels, "skipped_files": len(raw.skipped),
        "total": {s: int(len(data.y[s])) for s in counts}, "per_class": counts,
        "mean": data.mean, "std": data.std, "data_hash": data.data_hash,
    } | ({"source_details": raw.details} if raw.details else {})
    with atomic_set() as stage:  # the data, its figure and its metrics as one set
        data.save(stage(task.prepared, folder=True))
        plots.sample_grid(data.x["train"], data.y["train"], data.class_names, d.sample_grid, stage(task.samples))
        write_json(stage(task.data_metrics), summary)
    sizes = ", ".join(f"{s} {len(data.y[s])}" for s in counts)
    print(f"prepare: {task.name}: {data.num_classes} classes, {sizes}; mean {data.mean} std {data.std}", flush=True)
    return summary


@stage_main
def main(argv: list[str] | None = None) -> None:
    p = load()
    task = tasks.from_argv(sys.argv[1:] if argv is None else argv)
    check_writable(task.stage("prepare"))
    run(p, task)


if __name__ == "__main__":
    main()
