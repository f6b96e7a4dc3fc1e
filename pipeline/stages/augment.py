"""augment: build the albumentations pipeline from params.augment, save it, preview it.

Reads params: seed, augment, mlflow. Writes data/augmented/pipeline.json (what the training stages load),
optional offline copies (data/augmented/offline.npz) and plots/augment/preview.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import params as params_mod
from pipeline import plots, tracking
from pipeline.atomic import atomic_set
from pipeline.data import augment as aug
from pipeline.data.prepared import PreparedData
from pipeline.deps import check_outputs_writable
from pipeline.errors import stage_main

OUT_DIR = Path("data/augmented")


def run(p: params_mod.Params) -> None:
    """Build the albumentations pipeline from params.augment, save it (what training loads), preview it."""
    a = p.augment
    data = PreparedData.load()
    transform = aug.build(a, p.seed)
    names = [type(t).__name__ for t in transform.transforms] or ["(none: augment.enabled is false)"]
    print(f"augment: {', '.join(names)}", flush=True)

    with atomic_set() as stage:  # the pipeline (and copies) with its preview, as one set
        tmp = stage(OUT_DIR, folder=True)
        aug.save(transform, tmp / "pipeline.json")
        if a.offline_copies:
            # Materialized copies for augmentation-bound training; the pipeline reloads with the run's seed.
            saved = aug.load(tmp / "pipeline.json", seed=p.seed)
            x, y = data.x["train"], data.y["train"]
            copies = [np.stack([aug.apply(saved, img) for img in x]) for _ in range(a.offline_copies)]
            with open(tmp / "offline.npz", "wb") as fh:
                np.savez(fh, x=np.concatenate(copies), y=np.tile(y, a.offline_copies))
            print(f"augment: wrote {a.offline_copies} augmented copies of {len(x)} training images", flush=True)
        preview = aug.load(tmp / "pipeline.json", seed=p.seed)  # the saved file is what training will load
        rng = np.random.default_rng(p.seed)
        picks = rng.choice(len(data.x["train"]), size=min(a.preview_images, len(data.x["train"])), replace=False)
        originals = [data.x["train"][i] for i in picks]
        views = [[aug.apply(preview, img) for _ in range(a.preview_views)] for img in originals]
        plots.augmentation_preview(originals, views, stage(Path("plots/augment/preview.png")))
    preview_path = Path("plots/augment/preview.png")

    tracking.check_store()
    run_id = tracking.start_run(p.mlflow.experiment, "augment",
                                tracking.run_tags("augment", "albumentations", data.data_hash))
    with tracking.ended(run_id):
        tracking.log_params(run_id, params_mod.flatten({"seed": p.seed, "augment": a}))
        tracking.log_artifact(run_id, OUT_DIR / "pipeline.json", "augmentation")
        tracking.log_artifact(run_id, preview_path, "augmentation")
    print(f"augment: MLflow run {run_id}", flush=True)


@stage_main
def main() -> None:
    p = params_mod.load()
    check_outputs_writable("augment")
    run(p)


if __name__ == "__main__":
    main()
