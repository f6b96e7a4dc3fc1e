"""explain: what the trained scratch CNN does, in pictures.

Classic filters (edges, blur, sharpen, Sobel) on a test digit and on scikit-learn's sample photographs;
max/average pooling before and after with sizes; the model's learned first-layer filters; the feature maps of
every conv block for a few test images (edges -> patterns -> objects); the model's parameter table.
Reads params: explain (and models/scratch, data/prepared). Writes plots/explain/; logs everything to the
scratch model's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import params as params_mod
from pipeline import plots, tracking
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


def run(p: params_mod.Params) -> list[Path]:
    """Figures of the fundamentals on the trained scratch model; logged to its MLflow run."""
    e = p.explain
    data = PreparedData.load()
    model, meta, _ = loading.load(MODEL)
    figures = []
    rng = np.random.default_rng(p.seed)
    picks = rng.choice(len(data.x["test"]), size=min(e.images, len(data.x["test"])), replace=False)

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
    figures = [OUT / f.name for f in figures]

    run_id = meta.mlflow_run_id
    if run_id:
        tracking.check_store()
        for fig in [*figures, OUT / "layers.csv"]:
            tracking.log_artifact(run_id, fig, "explain")
    print(f"explain: wrote {len(figures)} figures to {OUT}/"
          + (f" and logged them to MLflow run {run_id}" if run_id else ""), flush=True)
    return figures


@stage_main
def main() -> None:
    p = params_mod.load()
    check_writable("explain")
    run(p)


if __name__ == "__main__":
    main()
