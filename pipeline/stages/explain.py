"""explain: what the trained scratch CNN does, in pictures.

Classic filters (edges, blur, sharpen, Sobel) on a test digit and on scikit-learn's sample photographs;
max/average pooling before and after with sizes; the model's learned first-layer filters; the feature maps of
every conv block for a few test images (edges -> patterns -> objects); the model's parameter table; and Grad-CAM
(where a model looks) of the scratch CNN and of every kept transfer model of both tasks, on the test images each
gets right and wrong with the most confidence.
Reads params: explain (and models/scratch, data/prepared). Writes plots/explain/; logs everything to the
scratch model's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import params as params_mod
from pipeline import plots, tasks, tracking
from pipeline.atomic import atomic_dir, write_csv
from pipeline.data.prepared import PreparedData
from pipeline.errors import stage_main
from pipeline.fundamentals.filters import CLASSIC_FILTERS, apply_filter, to_gray
from pipeline.fundamentals.ops import pool2d
from pipeline.fundamentals.summary import layer_table, table_rows
from pipeline.models import loading
from pipeline.outputs import check_writable

OUT = Path("plots/explain")
MODEL = Path("models/scratch/model.pt")


def sample_photos(width: int = 160) -> list[np.ndarray]:
    """scikit-learn's bundled photographs (china.jpg, flower.jpg), downscaled: real pictures, offline."""
    from sklearn.datasets import load_sample_images

    photos = []
    for img in load_sample_images().images:
        h, w = img.shape[:2]
        photos.append(np.asarray(Image.fromarray(img).resize((width, int(h * width / w)), Image.BILINEAR)))
    return photos


def classic_filter_figure(images: list[np.ndarray], path: Path) -> Path:
    cells, titles = [], []
    for image in images:
        gray = to_gray(image)
        cells.append(gray)
        titles.append(f"original {gray.shape[0]}x{gray.shape[1]}")
        for name, kernel in CLASSIC_FILTERS.items():
            out = apply_filter(gray, kernel)
            cells.append(np.abs(out) if "edge" in name or "sobel" in name else np.clip(out, 0, 1))
            titles.append(name)
    return plots.image_grid(cells, titles, path, cols=1 + len(CLASSIC_FILTERS),
                            suptitle="Classic 3x3 filters, convolved by hand (pipeline.fundamentals)", cell=1.6)


def pooling_figure(image: np.ndarray, path: Path) -> Path:
    gray = to_gray(image)[None, None]
    max1 = pool2d(gray, 2)
    max2 = pool2d(max1, 2)
    avg1 = pool2d(gray, 2, mode="avg")
    cells = [gray[0, 0], max1[0, 0], max2[0, 0], avg1[0, 0]]
    titles = [f"input {gray.shape[2]}x{gray.shape[3]}", f"max pool 2 -> {max1.shape[2]}x{max1.shape[3]}",
              f"max pool 2 again -> {max2.shape[2]}x{max2.shape[3]}",
              f"avg pool 2 -> {avg1.shape[2]}x{avg1.shape[3]}"]
    return plots.image_grid(cells, titles, path, cols=4, suptitle="Pooling halves the size, keeps the strongest "
                            "(max) or the average response", cell=2.0)


@torch.no_grad()
def block_outputs(model, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The activation output of every conv block of the model's conv base, for one image."""
    outputs: list[tuple[str, np.ndarray]] = []
    hooks = []
    base = getattr(model.net, "features", None) or model.net.base
    convs = [m for m in base.modules() if isinstance(m, torch.nn.Conv2d)]
    activations = [m for m in base.modules() if isinstance(m, torch.nn.ReLU | torch.nn.Tanh | torch.nn.GELU)]
    watched = activations if len(activations) == len(convs) else convs
    for i, module in enumerate(watched, start=1):
        hooks.append(module.register_forward_hook(
            lambda _m, _i, out, i=i: outputs.append((f"block {i}", out[0].cpu().numpy()))))
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def gradcam_figure(model, meta, data: PreparedData, count: int, path: Path) -> Path:
    """Grad-CAM of the predicted class on the test images the model gets right with the most confidence, and on
    the ones it gets wrong with the most confidence."""
    from pipeline.data.prepared import remap_labels
    from pipeline.gradcam import heatmaps
    from pipeline.predict import predict_proba

    mask = np.isin(data.y["test"], meta.class_ids)
    x, y = data.x["test"][mask], remap_labels(data.y["test"][mask], meta.class_ids)
    probs = predict_proba(model, x, meta.image_size)
    pred, confidence = probs.argmax(1), probs.max(1)
    rows = {}
    for label, chosen in (("right", np.flatnonzero(pred == y)), ("wrong", np.flatnonzero(pred != y))):
        chosen = chosen[np.argsort(-confidence[chosen])][:count]
        if not len(chosen):
            continue
        maps = heatmaps(model, x[chosen], pred[chosen])
        names = meta.class_names
        rows[label] = ([x[i] for i in chosen], list(maps),
                       [f"{names[pred[i]]} {confidence[i]:.2f}" + ("" if pred[i] == y[i] else f" (is {names[y[i]]})")
                        for i in chosen])
    return plots.gradcam_grid(rows, path, f"{meta.label}: Grad-CAM of the predicted class (red: its evidence), "
                                          "most confident right and wrong test images")


def run(p: params_mod.Params) -> list[Path]:
    """Figures of the fundamentals on the trained scratch model, and Grad-CAM maps of every trained model; each
    logged to its model's MLflow run."""
    e = p.explain
    data = PreparedData.load()
    model, meta, _ = loading.load(MODEL)
    figures = []
    rng = np.random.default_rng(p.seed)
    picks = rng.choice(len(data.x["test"]), size=min(e.images, len(data.x["test"])), replace=False)
    others = [f for t in tasks.TASKS.values() for f in sorted(t.models.glob("*.pt"))]
    gradcams: dict[Path, str | None] = {}

    with atomic_dir(OUT) as out:  # all figures or none: the folder is replaced as a whole
        figures.append(classic_filter_figure([data.x["test"][picks[0]], *sample_photos()], out / "classic_filters.png"))
        figures.append(pooling_figure(data.x["test"][picks[0]], out / "pooling.png"))
        first_conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
        figures.append(plots.filter_grid(first_conv.weight.detach().cpu().numpy(), out / "first_layer_filters.png",
                                         f"{meta.name}: learned first-layer filters "
                                         f"({first_conv.out_channels} x {first_conv.kernel_size[0]}x"
                                         f"{first_conv.kernel_size[1]})"))
        for n, i in enumerate(picks):
            image = data.x["test"][i]
            figures.append(plots.feature_maps(block_outputs(model, image), image, out / f"feature_maps_{n}.png",
                                              e.max_maps))
        size = meta.image_size
        rows = table_rows(layer_table(model.net, (data.channels, size, size)))
        write_csv(out / "layers.csv", rows)
        task_data = {"digits": data}
        for path in [MODEL, *others]:
            m, m_meta, _ = (model, meta, None) if path == MODEL else loading.load(path)
            if m_meta.task not in task_data:
                task_data[m_meta.task] = PreparedData.load(tasks.TASKS[m_meta.task].prepared)
            fig = gradcam_figure(m, m_meta, task_data[m_meta.task], e.gradcam_images, out / f"gradcam_{m_meta.label}.png")
            gradcams[OUT / fig.name] = m_meta.mlflow_run_id
    figures = [OUT / f.name for f in figures]

    run_id = meta.mlflow_run_id
    if run_id or any(gradcams.values()):
        tracking.check_store()
    if run_id:
        for fig in [*figures, OUT / "layers.csv"]:
            tracking.log_artifact(run_id, fig, "explain")
    for fig, owner in gradcams.items():
        if owner and tracking.run_exists(owner):
            tracking.log_artifact(owner, fig, "explain")
    print(f"explain: wrote {len(figures) + len(gradcams)} figures to {OUT}/ (Grad-CAM of {len(gradcams)} models)"
          + ("; logged them to the models' MLflow runs" if run_id else ""), flush=True)
    return [*figures, *gradcams]


@stage_main
def main() -> None:
    p = params_mod.load()
    check_writable("explain")
    run(p)


if __name__ == "__main__":
    main()
