"""A model card for every evaluated model, written from the run's own records (Hugging Face's sections: model
details, uses, limitations, training, evaluation, how to get started). evaluate sets it as the registered
version's description and the training run's note (both rendered in the MLflow UI) and writes it beside the
model's reports."""

from __future__ import annotations

from pipeline import tasks
from pipeline.models.checkpoint import ModelMeta

USES = {
    "digits": ("Classifying 28x28 grey images of single handwritten digits (0-9), centred as in MNIST, pixels in "
               "[0, 1]: teaching, experiments, a baseline to compare against."),
    "photos": ("Sorting single photos of prepared Indian foods into five groups (grains, legumes and nuts; leafy "
               "vegetables and roots; other vegetables; fruits; fish and seafood): teaching transfer learning."),
}
NOT_TESTED = {
    "digits": ("Not tested on: digits that are not centred or are rotated beyond the training augmentation, other "
               "handwriting (letters, other scripts), photos of digits, colour images; the shift claim in "
               "reports/claims.md measures how fast accuracy falls when digits move."),
    "photos": ("Not tested on: foods outside the five groups or outside the IFCT 2017 book's photographs, photos "
               "with several foods, other cuisines, other lighting or cameras; the test split holds a few dozen "
               "photos per class, so the accuracy is known to a few percent only. Not for dietary or medical "
               "decisions."),
}


# What each kind of training's recipe is made of (the last part of a params key), beside the optimizer's keys
COMMON = ("optimizer", "lr", "batch_size", "scheduler", "weight_decay", "label_smoothing")
BY_STRATEGY = {
    None: ("preset", "epochs", "enabled"),  # train_scratch: the model, its epochs, augmentation on or off
    "feature_extraction": ("backbone", "weights", "image_size", "head_steps"),
    "fine_tuning": ("backbone", "weights", "image_size", "head_steps", "steps", "unfreeze_blocks",
                    "backbone_lr_factor"),
    "scratch": ("scratch_model", "scratch_image_size", "cnn_steps"),
    "scratch_backbone": ("backbone", "image_size", "steps"),
}


def scratch_cnn(params: dict[str, str], section: str) -> str:
    """The sweep's scratch CNN by name: its scratch_model, or the model section's preset when that is `model`."""
    name = params.get(f"{section}.scratch_model", "model")
    return params.get("model.preset", "the model section's CNN") if name == "model" else name


def recipe(meta: ModelMeta, params: dict[str, str], section: str) -> list[str]:
    """The params keys that made this model, in order: train_scratch's train:, model: and augment: keys, or the
    sweep's own section (`section`, plus model.preset when its scratch CNN is the model section's), each
    strategy's own keys only, then the precision it trained in (what `auto` chose, when the run recorded it)."""
    scratch = meta.stage == "train_scratch"
    wanted = COMMON + BY_STRATEGY.get(None if scratch else meta.strategy, ())
    own = ("train.", "model.", "augment.") if scratch else (f"{section}.",)
    keys = [k for k in sorted(params) if k.startswith(own) and k.split(".")[-1] in wanted]
    if meta.strategy == "scratch" and not scratch and params.get(f"{section}.scratch_model") == "model":
        keys.append("model.preset")
    precision = "trainer.precision_used" if "trainer.precision_used" in params else "trainer.precision"
    return [k for k in [*keys, precision] if k in params]


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def card(meta: ModelMeta, result: dict, data: dict, params: dict[str, str], spread: dict | None,
         version: str | None, registered: str | None) -> str:
    """The card's Markdown. `data`: the task's metrics/data*.json; `params`: the training run's params;
    `spread`: the sweep's spread of this strategy at this N (transfer models), or None."""
    source = data.get("source", "?")
    details = data.get("source_details", {})
    section = next((k.split(".")[0] for k in params if k.endswith(".backbone")), "transfer")
    recipe_keys = recipe(meta, params, section)
    if meta.stage == "train_scratch":
        what = meta.name
    elif meta.strategy == "scratch":
        what = (f"our CNN ({scratch_cnn(params, section)}) trained from scratch on {meta.target_per_class} labelled "
                "images per class, the sweep's baseline")
    else:
        what = (f"{meta.strategy} of {params.get(section + '.backbone', 'a backbone')} on {meta.target_per_class} "
                "labelled images per class")
    lines = [f"# {meta.label}" + (f" ({registered} v{version})" if version else ""), "",
             "## Model details",
             f"- What: {what}; trained by the `{tasks.get(meta.task).stages.get(meta.stage, meta.stage)}` stage of cnn-pipeline on the {meta.task} task.",
             f"- Classes ({len(meta.class_names)}): {', '.join(meta.class_names)}.",
             f"- Input: float pixels in [0, 1], shaped (N, C, {meta.image_size}, {meta.image_size}); normalization "
             "(and any resizing the network needs) is inside the model.",
             f"- Parameters: {result.get('params_total', '?')}; model file {result.get('model_file_mb', 0):.2f} MB."
             if "params_total" in result else
             f"- Model file: {result.get('model_file_mb', 0):.2f} MB.",
             f"- Training run: {meta.mlflow_run_id}.", "",
             "## Uses", f"- Intended: {USES.get(meta.task, meta.task)}",
             "- Out of scope: anything decided about people; inputs unlike the training data (see Limitations).", "",
             "## Limitations", f"- {NOT_TESTED.get(meta.task, 'Tested only on its task test split.')}",
             f"- Calibration: expected calibration error {result.get('ece', float('nan')):.4f} on the test split "
             "(0 is perfectly calibrated): read its probabilities with that in mind.", "",
             "## Training", f"- Data: `{source}`, prepared data hash {data.get('data_hash', '?')}; images per split "
             f"{data.get('total', {})}."]
    if details.get("package"):
        lines.append(f"- Source: npm `{details['package']}` ({details.get('license')}; photos from the IFCT 2017 "
                     "book), fetched at run time, deduplicated by content.")
    if recipe_keys:
        lines.append("- Recipe: " + ", ".join(f"{k} {params[k]}" for k in recipe_keys) + ".")
    lines += ["", "## Evaluation", f"On the untouched test split of its task ({result.get('test_images')} images):",
              "", "| metric | value |", "|---|---|"]
    for key in ("accuracy", "top_3_accuracy", "top_2_accuracy", "f1_macro", "ece", "latency_ms_p50",
                "throughput_images_per_s", "int8_accuracy", "int8_weights_mb"):
        if key in result:
            lines.append(f"| {key} | {_fmt(result[key])} |")
    if spread:
        lines += ["", f"Over the sweep's {spread['n']} seeds at this N (other images, init and order): test accuracy "
                      f"{spread['mean']:.4f} ± {spread['std']:.4f} (min {spread['min']:.4f}, max {spread['max']:.4f}, "
                      f"95% interval {spread['ci95'][0]:.4f}-{spread['ci95'][1]:.4f}); this model is seed 0's."]
    uri = f"models:/{registered}/{version}" if version else f"runs:/{meta.mlflow_run_id}/model"
    lines += ["", "## How to get started", "```python",
              "import mlflow, numpy as np",
              f"model = mlflow.pyfunc.load_model('{uri}')",
              f"logits = model.predict(np.random.rand(2, {3 if meta.task == 'photos' else 1}, {meta.image_size}, "
              f"{meta.image_size}).astype('float32'))  # the class is the argmax",
              "```",
              f"Serve it: `mlflow models serve -m {uri} --env-manager local -w 1`" + (
                  f"; when this version is its registered model's champion, an ONNX export is logged beside the "
                  f"PyTorch model (`onnx/{registered}.onnx`)." if registered else ".")]
    return "\n".join(lines) + "\n"
