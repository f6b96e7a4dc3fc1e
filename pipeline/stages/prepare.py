"""prepare: get the images, check them, split them, describe them.

Reads params: seed, data. Writes data/prepared/ (uint8 splits, class names, train mean/std),
metrics/data.json (counts per class and split) and plots/prepare/samples.png.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import plots
from pipeline.atomic import atomic_dir, write_json
from pipeline.data import sources
from pipeline.data.prepared import PREPARED_DIR, build_prepared, class_counts
from pipeline.errors import stage_main
from pipeline.params import load


@stage_main
def main() -> None:
    p = load()
    d = p.data
    raw_dir = Path(d.raw_dir)
    print(f"prepare: source={d.source} image_size={d.image_size} channels={d.channels}", flush=True)
    if d.source == "embedded":
        raw = sources.load_embedded(d.image_size, d.channels)
    elif d.source == "folder":
        raw = sources.load_folder(raw_dir, d.image_size, d.channels, d.on_corrupt)
    else:
        raw = sources.load_torchvision(d.source, raw_dir, d.image_size, d.channels)
    for path in raw.skipped:
        print(f"prepare: skipped unreadable image {path}", flush=True)

    data = build_prepared(raw.images, raw.labels, raw.class_names,
                          (d.split.train, d.split.val, d.split.test), p.seed, d.min_per_class, d.max_per_class)
    with atomic_dir(PREPARED_DIR) as tmp:
        data.save(tmp)
    counts = class_counts(data)
    write_json("metrics/data.json", {
        "source": d.source, "num_classes": data.num_classes, "image_size": data.image_size,
        "channels": data.channels, "skipped_files": len(raw.skipped),
        "total": {s: int(len(data.y[s])) for s in counts}, "per_class": counts,
        "mean": data.mean, "std": data.std,
    })
    plots.sample_grid(data.x["train"], data.y["train"], data.class_names, d.sample_grid,
                      Path("plots/prepare/samples.png"))
    sizes = ", ".join(f"{s} {len(data.y[s])}" for s in counts)
    print(f"prepare: {data.num_classes} classes, {sizes}; mean {data.mean} std {data.std}", flush=True)


if __name__ == "__main__":
    main()
