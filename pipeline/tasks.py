"""The pipeline's tasks: each its own data, augmentation and transfer sweep, as a table.

digits  the grey digits (params.data: the embedded MNIST digits by default), where train_scratch, compare,
        explain and the claims run too, and where transfer learning from ImageNet loses
photos  real colour food photos (params.photos), the seed's own transfer-learning setting

Each task's stages are the same modules with `--task <name>` (dvc.yaml: prepare / prepare_photos, augment /
augment_photos, transfer_learn / transfer_photos), so `dvc repro` reruns only the task whose params or data
changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Task:
    name: str
    data: str  # its params sections
    augment: str
    transfer: str
    registered: str  # the params.mlflow key naming its transfer models' registered model
    stages: dict[str, str]  # the stage module -> its DVC stage name
    prepared: Path
    augmented: Path
    data_metrics: Path
    samples: Path
    preview: Path
    models: Path
    transfer_metrics: Path
    transfer_plots: Path

    def stage(self, module: str) -> str:
        return self.stages[module]

    def section(self, p, kind: str):
        """The task's params section of a kind: data, augment or transfer."""
        return getattr(p, getattr(self, kind))


TASKS = {
    "digits": Task("digits", "data", "augment", "transfer", "transfer_model",
                   {"prepare": "prepare", "augment": "augment", "transfer_learn": "transfer_learn"},
                   Path("data/prepared"), Path("data/augmented"), Path("metrics/data.json"),
                   Path("plots/prepare/samples.png"), Path("plots/augment/preview.png"), Path("models/transfer"),
                   Path("metrics/transfer_learn.json"), Path("plots/transfer_learn")),
    "photos": Task("photos", "photos", "augment_photos", "transfer_photos", "photo_model",
                   {"prepare": "prepare_photos", "augment": "augment_photos", "transfer_learn": "transfer_photos"},
                   Path("data/prepared_photos"), Path("data/augmented_photos"), Path("metrics/data_photos.json"),
                   Path("plots/prepare/samples_photos.png"), Path("plots/augment/preview_photos.png"),
                   Path("models/transfer_photos"), Path("metrics/transfer_photos.json"), Path("plots/transfer_photos")),
}


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise PipelineError(f"--task {name}: unknown task; known: {', '.join(TASKS)}") from None


def from_argv(argv: list[str]) -> Task:
    """The task a stage's command line names (`--task photos`); digits without one."""
    if "--task" in argv:
        i = argv.index("--task")
        if i + 1 >= len(argv):
            raise PipelineError(f"--task needs a name; known: {', '.join(TASKS)}")
        return get(argv[i + 1])
    return TASKS["digits"]
