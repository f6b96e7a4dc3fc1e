"""augment: build the albumentations pipeline from params, save it, preview it (one task: `--task digits|photos`).

Reads params: seed, the task's augment section (augment | augment_photos), mlflow. Writes the task's pipeline
(data/augmented/pipeline.json | data/augmented_photos/pipeline.json: what its trainings load), optional offline
copies (offline.npz beside it) and a preview (plots/augment/preview.png | preview_photos.png).
"""

from __future__ import annotations

import sys

import numpy as np

from pipeline import params as params_mod
from pipeline import plots, tasks, tracking
from pipeline.atomic import atomic_set
from pipeline.data import augment as aug
from pipeline.data.prepared import PreparedData
from pipeline.errors import stage_main
from pipeline.outputs import check_writable


def run(p: params_mod.Params, task: tasks.Task = tasks.TASKS["digits"]) -> None:
    """Build the task's albumentations pipeline from its params, save it (what training loads), preview it."""
    a = task.section(p, "augment")
    data = PreparedData.load(task.prepared)
    transform = aug.build(a, p.seed)
    names = [type(t).__name__ for t in transform.transforms] or [f"(none: {task.augment}.enabled is false)"]
    print(f"augment: {task.name}: {', '.join(names)}", flush=True)

    with atomic_set() as stage:  # the pipeline (and copies) with its preview, as one set
        out = stage(task.augmented, folder=True)
        aug.save(transform, out / "pipeline.json")
        if a.offline_copies:
            # Materialized copies for augmentation-bound training; the pipeline reloads with the run's seed.
            saved = aug.load(out / "pipeline.json", seed=p.seed)
            x, y = data.x["train"], data.y["train"]
            copies = [np.stack([aug.apply(saved, img) for img in x]) for _ in range(a.offline_copies)]
            with open(out / "offline.npz", "wb") as fh:
                np.savez(fh, x=np.concatenate(copies), y=np.tile(y, a.offline_copies))
            print(f"augment: wrote {a.offline_copies} augmented copies of {len(x)} training images", flush=True)
        preview = aug.load(out / "pipeline.json", seed=p.seed)  # the saved file is what training will load
        rng = np.random.default_rng(p.seed)
        picks = rng.choice(len(data.x["train"]), size=min(a.preview_images, len(data.x["train"])), replace=False)
        originals = [data.x["train"][i] for i in picks]
        views = [[aug.apply(preview, img) for _ in range(a.preview_views)] for img in originals]
        plots.augmentation_preview(originals, views, stage(task.preview))

    tracking.check_store()
    run_id = tracking.start_run(p.mlflow.experiment, task.stage("augment"),
                                tracking.run_tags(task.stage("augment"), "albumentations", data.data_hash))
    with tracking.ended(run_id):
        tracking.log_params(run_id, params_mod.flatten({"seed": p.seed, task.augment: a}))
        tracking.log_artifact(run_id, task.augmented / "pipeline.json", "augmentation")
        tracking.log_artifact(run_id, task.preview, "augmentation")
    print(f"augment: {task.name}: MLflow run {run_id}", flush=True)


@stage_main
def main(argv: list[str] | None = None) -> None:
    p = params_mod.load()
    task = tasks.from_argv(sys.argv[1:] if argv is None else argv)
    check_writable(task.stage("augment"))
    run(p, task)


if __name__ == "__main__":
    main()
