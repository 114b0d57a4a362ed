"""Build everything a run needs from a resolved config, then train or test.

`train.py` and `test.py` are thin wrappers around `run_training` and `run_test`.

The run folder. train.py trains in `run_folder(cfg)`: {output_dir}/{dataset.name}/{name}.
test.py, visualize.py and retrieve.py read and write the folder `run_folder_of`
gives: a saved configs.yaml's own folder, or for an experiment file the folder it
trains into. Scoring a checkpoint from elsewhere with an experiment file (IRRA's
best.pth with configs/CUHK-PEDES/irra.yaml) can so leave evaluation outputs in a
folder whose run has not been trained; they do not keep train.py from starting
that run there (`EVALUATION_OUTPUTS`).
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import signal
from pathlib import Path

import torch

from datasets import (DatasetError, ImageAugment, TextAugment, build_dataset, build_eval_loaders,
                      build_train_loader, get_dataset_class, statistics_table)
from datasets.cache import ImageCache, default_cache_dir
from model import build_model
from model.irra import from_irra_checkpoint, is_irra_state_dict
from solver import (WarmupCosineSchedule, optimizer_from_config, schedule_from_config,
                    schedule_multiplier)
from utils import comm
from utils.checkpoint import CheckpointError, load_checkpoint, load_model_state
from utils.config import ConfigError, dump_config, save_config, to_plain
from utils.errors import StopRequested, UserError
from utils.logger import log_to_file, setup_logger
from utils.misc import count_parameters, resolve_device, set_seed
from utils.signals import stop_signals_raise

from .evaluator import QUICK_AUDIT_SAMPLES, evaluate, metrics_table
from .resume import Difference, compare_for_resume, record_resume
from .trainer import Trainer, check_resumable, log_expert_usage, write_json

logger = logging.getLogger("comoe")
CONFIG_NAME = "configs.yaml"


class RunFolderError(UserError, RuntimeError):
    pass


# What evaluation writes into a run folder (test.py, visualize.py and retrieve.py).
EVALUATION_OUTPUTS = ("test.log", "test_metrics*.json", "vis", "gallery_cache")


def run_folder(cfg) -> Path:
    """The folder train.py trains `cfg` in."""
    return Path(cfg.output_dir) / cfg.dataset.name / cfg.name


def run_folder_of(config_file: str | Path, cfg) -> Path:
    """The run folder of evaluation with `config_file` (resolved into `cfg`): a saved
    configs.yaml's own folder, wherever the run folder was moved, else `run_folder(cfg)`."""
    config_file = Path(config_file).resolve()
    return config_file.parent if config_file.name == CONFIG_NAME else run_folder(cfg)


def follow_moved_run(cfg, config_files: list[str], opts: list[str]) -> None:
    """resume=true from a run's saved configs.yaml: resume the run where that file is now.

    configs.yaml holds the absolute output_dir it was trained under, so after the run
    folder was moved (to another disk, another user's home) it would resume in, or be
    refused at, the old place. When the folder still ends in <dataset.name>/<name>,
    `cfg.output_dir` is pointed at its new parent (a path, which a resume may change);
    otherwise the error says why. An explicit output_dir=... or name=... wins.
    """
    if not cfg.resume or len(config_files) != 1 or Path(config_files[0]).name != CONFIG_NAME:
        return
    if any(opt.split("=", 1)[0].strip() == "output_dir" for opt in opts):
        return
    here = Path(os.path.abspath(config_files[0])).parent  # as given: a symlinked folder keeps its name
    there = run_folder(cfg)
    if here.resolve() == there.resolve():
        return
    if here.name != cfg.name or here.parent.name != cfg.dataset.name:
        raise RunFolderError(
            f"resume=true with {here / CONFIG_NAME}: that file belongs to the run folder {there}, "
            f"and the folder it is in now does not end in {cfg.dataset.name}/{cfg.name}, so it "
            f"cannot be that run's folder. Rename the folder to {cfg.name} (inside a folder "
            f"named {cfg.dataset.name}), or resume from {there / CONFIG_NAME}.")
    logger.warning("resume=true: the run folder was moved from %s to %s; the run continues "
                   "there (output_dir=%s)", there, here, here.parent.parent)
    cfg.output_dir = str(here.parent.parent)


def load_dataset(cfg, generate: bool = False):
    """The config's dataset. With `generate` (a new training run) and dataset.generate, a
    missing dataset is first generated; evaluation never generates data, so that it
    cannot score a run on data other than its own."""
    get_dataset_class(cfg.dataset.name)  # an unknown name fails before anything is generated
    root = Path(cfg.dataset.root_dir)
    if generate and cfg.dataset.generate:
        from datasets.synth import ensure_synthetic
        if comm.is_main_process():
            folder = ensure_synthetic(root, cfg.dataset.name,
                                      num_ids=cfg.dataset.generate_num_ids, seed=cfg.seed)
            logger.info("dataset.generate=true: synthetic %s-format data in %s",
                        cfg.dataset.name, folder)
        comm.barrier()
    try:
        return build_dataset(cfg.dataset.name, root, val_ids=cfg.dataset.val_ids, seed=cfg.seed)
    except DatasetError as err:
        if generate or not cfg.dataset.generate:
            raise
        from datasets.synth import FORMAT_OF_DATASET
        raise DatasetError(
            f"{err} Evaluation and resumed training never generate data (dataset.generate=true "
            f"applies to a new run only). To recreate this run's generated data: python -m "
            f"datasets.synth --root {root} --format {FORMAT_OF_DATASET[cfg.dataset.name]} "
            f"--num_ids {cfg.dataset.generate_num_ids} --seed {cfg.seed}") from err


def image_augment(cfg) -> ImageAugment:
    return ImageAugment(flip=cfg.input.flip, padding=cfg.input.padding,
                        crop=cfg.input.padding > 0, erasing=cfg.input.erasing)


def text_augment(cfg) -> TextAugment:
    return TextAugment(enabled=cfg.input.text_aug, mask_prob=cfg.input.text_mask_prob,
                       replace_prob=cfg.input.text_replace_prob,
                       delete_prob=cfg.input.text_delete_prob)


def prepare_image_cache(cfg, paths, skip_bad_images: bool = False) -> str | None:
    """Folder of the decoded-image cache (built by rank 0; the others wait), or None."""
    if not cfg.dataset.image_cache:
        return None
    cache_dir = cfg.dataset.cache_dir or str(default_cache_dir(cfg.dataset.root_dir))
    if comm.is_main_process():
        ImageCache.open(paths, tuple(cfg.input.size), cache_dir,
                        num_workers=cfg.dataset.num_workers, skip_bad_images=skip_bad_images,
                        interpolation=cfg.input.interpolation,
                        load_truncated=cfg.dataset.load_truncated_images)
    comm.barrier()
    return cache_dir


def eval_loaders(cfg, split, device: torch.device):
    return build_eval_loaders(split, image_size=tuple(cfg.input.size),
                              cache_dir=prepare_image_cache(cfg, split.image_paths),
                              batch_size=cfg.eval.batch_size, text_length=cfg.dataset.text_length,
                              num_workers=cfg.dataset.num_workers,
                              pin_memory=cfg.dataset.pin_memory and device.type == "cuda",
                              interpolation=cfg.input.interpolation,
                              load_truncated=cfg.dataset.load_truncated_images)


def train_loader(cfg, dataset, device: torch.device):
    d = cfg.dataset
    steps, per_rank = cfg.solver.accumulation_steps, cfg.solver.batch_size // comm.get_world_size()
    if steps < 1 or per_rank % steps:
        raise ConfigError(f"solver.batch_size={cfg.solver.batch_size} over "
                          f"{comm.get_world_size()} process(es) gives {per_rank} samples per "
                          f"process, which must be a multiple of "
                          f"solver.accumulation_steps={steps}")
    if not d.drop_last and comm.get_world_size() > 1:
        raise ConfigError(f"dataset.drop_last=false trains on the last incomplete batch as one "
                          f"process does (IRRA); {comm.get_world_size()} processes cannot split "
                          f"it evenly. Use dataset.drop_last=true under torchrun")
    cache_dir = prepare_image_cache(cfg, [item.path for item in dataset.train], d.skip_bad_images)
    try:
        return build_train_loader(
            dataset, batch_size=cfg.solver.batch_size, sampler=d.sampler,
            num_instances=d.num_instance, image_size=tuple(cfg.input.size),
            augment=image_augment(cfg), text_length=d.text_length, text_aug=text_augment(cfg),
            num_workers=d.num_workers, pin_memory=d.pin_memory and device.type == "cuda",
            persistent_workers=d.persistent_workers, seed=cfg.seed, rank=comm.get_rank(),
            world_size=comm.get_world_size(), skip_bad_images=d.skip_bad_images,
            cache_dir=cache_dir, augment_in_workers=device.type == "cpu", drop_last=d.drop_last,
            interpolation=cfg.input.interpolation, load_truncated=d.load_truncated_images)
    except ValueError as err:  # its arguments come from the config
        if isinstance(err, UserError):
            raise
        raise ConfigError(f"dataset.sampler={d.sampler}, dataset.num_instance="
                          f"{d.num_instance}, solver.batch_size={cfg.solver.batch_size}: "
                          f"{err}") from err


def _check_run_folder(cfg, run_dir: Path) -> dict | None:
    """Refuse a start that would mix two runs in one folder; for resume=true, the
    checkpoint to continue from (checked), or None when the folder holds a start
    that never saved one (the run then starts from the beginning in it)."""
    last = run_dir / "last.pth"
    if cfg.resume:
        if last.is_file():
            ckpt = load_checkpoint(last)
            check_resumable(ckpt, str(last))
            return ckpt
        if not (run_dir / CONFIG_NAME).is_file():
            raise RunFolderError(
                f"resume=true but {last} does not exist; nothing to resume. "
                f"Start a new run without resume=true.")
        return None
    taken = sorted(p.name for p in run_dir.iterdir()
                   if not any(fnmatch.fnmatch(p.name, out) for out in EVALUATION_OUTPUTS)
                   ) if run_dir.is_dir() else []
    if taken:
        raise RunFolderError(f"run folder {run_dir} already exists{_taken_hint(run_dir, taken)}; "
                             f"to start another run, choose a new name (name=...) or remove "
                             f"the folder.")
    return None


def _taken_hint(run_dir: Path, names: list[str]) -> str:
    """What the files `names` of a taken run folder allow, naming only those that exist."""
    if CONFIG_NAME not in names:
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f" and holds {listed}: no {CONFIG_NAME}, so no run of this codebase to resume"
    command = f"{comm.train_command()} --config_file {run_dir / CONFIG_NAME} resume=true"
    if "last.pth" in names:
        return f". To continue it: {command}"
    why = "; its train.log says why" if "train.log" in names else ""
    return (f". It holds no checkpoint (a start that never saved one{why}). To start it again "
            f"in this folder: {command}")


def _open_run_folder(cfg, run_dir: Path, position: dict | None,
                     differences: list[Difference]) -> None:
    """Create (or, on resume from `position`, update) the run folder; rank 0 writes, the
    others wait. Then the log file, which starts with the records of the start-up.

    configs.yaml always describes the run as it continues: written at every start and
    resume (a resume's changes are also listed in resumes.yaml)."""
    comm.barrier()  # every rank has checked everything before the folder changes
    if comm.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config({**to_plain(cfg), "resume": False}, run_dir / CONFIG_NAME)
        if position is not None:
            record_resume(run_dir, position, differences)
    comm.barrier()
    setup_logger(run_dir, rank=comm.get_rank())


def _tensorboard(run_dir: Path):
    if not comm.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        logger.warning("tensorboard is not installed; no TensorBoard scalars are written")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def configure_backends(cfg) -> None:
    """Process-wide math settings of a run, so that every script that computes with a
    model (train.py, its final test, test.py, visualize.py, retrieve.py) computes alike."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.solver.tf32
    torch.backends.cudnn.allow_tf32 = cfg.solver.tf32


def compile_training_model(model: torch.nn.Module, cfg) -> None:
    """solver.compile: torch.compile the training forward (model + losses).

    In place (`nn.Module.compile`), so state-dict keys and `ddp_model.module` stay as
    they are; evaluation calls the uncompiled encoders.
    """
    if cfg.solver.compile:
        mode = cfg.solver.compile_mode
        model.compile(mode=None if mode == "default" else mode)


def run_training(cfg) -> dict:
    """Train, keep best.pth (val R1) and last.pth, then test best.pth.

    Everything that can be checked is checked before the run folder is created or
    changed (config values, dataset, model, optimizer and schedule, and on resume the
    config changes and the checkpoint, loaded), so a failed start leaves nothing
    behind. From then on, a fatal error also goes to train.log, with the command that
    resumes the run.
    """
    device = resolve_device(cfg.device)
    comm.init_distributed(device)
    setup_logger(None, rank=comm.get_rank())  # records kept for train.log until it exists
    run_dir = run_folder(cfg)
    ckpt = _check_run_folder(cfg, run_dir)
    differences = []
    if ckpt is not None:
        differences = compare_for_resume(ckpt["config"], to_plain(cfg), ckpt["epoch"],
                                         str(run_dir / "last.pth"))
    # train.log starts with these: the records of the start-up are kept for it.
    logger.info("run folder: %s", run_dir)
    logger.info("config (%s):\n%s", run_dir / CONFIG_NAME, dump_config(cfg).rstrip())
    logger.info("device: %s, processes: %d", device, comm.get_world_size())
    if cfg.resume and ckpt is None:
        logger.warning("resume=true: %s holds no last.pth (the run stopped before its first "
                       "save); training starts from the beginning", run_dir)
    for difference in differences:
        logger.warning("resume: %s", difference)
    if ckpt is not None:
        trained_with = len(ckpt.get("rng_ranks") or [None])
        if trained_with != comm.get_world_size():
            logger.warning("resume: the run was trained by %d process(es), it continues with %d: "
                           "the global batch is the same, but the run is no longer the one an "
                           "uninterrupted run would have been (other random streams)",
                           trained_with, comm.get_world_size())
    set_seed(cfg.seed, cfg.deterministic)
    configure_backends(cfg)

    # A resume never generates data: it must train on the data it was trained on.
    dataset = load_dataset(cfg, generate=ckpt is None)
    logger.info("%s in %s:\n%s", cfg.dataset.name, cfg.dataset.root_dir, statistics_table(dataset))
    if ckpt is not None and ckpt.get("num_classes") not in (None, dataset.num_train_pids):
        raise DatasetError(
            f"{cfg.dataset.name} under {cfg.dataset.root_dir} has {dataset.num_train_pids} "
            f"training identities, but the run in {run_dir} was trained on "
            f"{ckpt['num_classes']}: not the same training set, so it cannot be resumed")
    loader = train_loader(cfg, dataset, device)
    val = eval_loaders(cfg, dataset.val, device) if dataset.val is not None else None
    model = build_model(cfg, num_classes=dataset.num_train_pids,
                        checkpoint_state=None if ckpt is None else ckpt["model"]).to(device)
    trainer = _build_trainer(cfg, model, loader, val, device, run_dir, dataset.num_train_pids)
    position = None
    if ckpt is not None:
        trainer.resume(ckpt, str(run_dir / "last.pth"))
        _log_schedule_change(ckpt["config"]["solver"], cfg.solver, trainer.global_step,
                             len(loader), trainer.optimizer)
        position = {k: ckpt[k] for k in ("epoch", "batch_in_epoch", "global_step")}
        ckpt.clear()  # frees the checkpoint's tensors (several times the model's size)
    _open_run_folder(cfg, run_dir, position, differences)
    try:
        return _train_in_folder(cfg, run_dir, device, dataset, model, trainer)
    except BaseException as err:
        _log_failure(err, run_dir)
        raise


def _build_trainer(cfg, model, loader, val, device: torch.device, run_dir: Path,
                   num_classes: int) -> Trainer:
    """The trainer of `model`, with its optimizer, schedule and grad scaler (and DDP
    under torchrun); its TensorBoard writer comes with the run folder."""
    if cfg.solver.accumulation_steps > 1:
        logger.warning("solver.accumulation_steps=%d: SDM, ITC, CMPM and CoAR are computed within "
                       "each micro-batch of %d, not over the whole batch of %d",
                       cfg.solver.accumulation_steps,
                       cfg.solver.batch_size // cfg.solver.accumulation_steps,
                       cfg.solver.batch_size)
    if val is None:
        logger.warning("no validation split: best.pth follows the last epoch; set "
                       "dataset.val_ids=N to hold out N training identities")
    logger.info("parameters: %.2fM total, %.2fM trainable", count_parameters(model) / 1e6,
                count_parameters(model, trainable_only=True) / 1e6)
    ddp_model = model
    if comm.get_world_size() > 1:
        # Same initial weights everywhere (DDP broadcasts rank 0's anyway), but each
        # rank draws its own dropout and MLM masks from here on.
        torch.manual_seed(cfg.seed + comm.get_rank())
        # Gradients as views into DDP's all-reduce buckets: no second copy of them, and
        # no copy into and out of the buckets each step.
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    compile_training_model(ddp_model, cfg)
    optimizer = optimizer_from_config(model, cfg.solver)
    scheduler = WarmupCosineSchedule(optimizer, **schedule_from_config(cfg.solver, len(loader)))
    scaler = torch.amp.GradScaler(device.type) if cfg.solver.precision == "fp16" else None
    return Trainer(cfg, ddp_model, loader, val, optimizer, scheduler, scaler, device, run_dir,
                   num_classes=num_classes)


def _train_in_folder(cfg, run_dir: Path, device: torch.device, dataset, model,
                     trainer: Trainer) -> dict:
    tb = trainer.tb = _tensorboard(run_dir)
    trainer.train()
    if trainer.val_loaders is None:
        trainer.save("best.pth", trainer.model_state())
    comm.barrier()
    logger.info("training done; best val R1 %.2f at epoch %d", trainer.best_metric,
                trainer.best_epoch)
    best = run_dir / "best.pth"

    def stopped(signum: int) -> str:
        return (f"stopped by {signal.Signals(signum).name} during the final test: training is "
                f"complete and {best} is saved. Score it with: python test.py --config_file "
                f"{run_dir / CONFIG_NAME}")
    with stop_signals_raise(stopped):
        model, epoch = load_for_evaluation(cfg, best, device, model=model)
        result = evaluate_checkpoint(cfg, best, model, epoch, dataset, device, run_dir,
                                     tb_writer=tb)
    if tb is not None:
        tb.close()
    comm.cleanup()
    return result


def _log_schedule_change(saved, solver, step: int, steps_per_epoch: int, optimizer) -> None:
    """After a resume that changed solver.num_epoch: the lr before and after."""
    if saved["num_epoch"] == solver.num_epoch:
        return
    group = optimizer.param_groups[0]
    # The other schedule settings cannot change on resume (processor.resume).
    old = group["base_lr"] * schedule_multiplier(
        step, **schedule_from_config(solver, steps_per_epoch, num_epoch=saved["num_epoch"]))
    logger.warning("solver.num_epoch %d -> %d: the warm-up + cosine schedule now ends at step "
                   "%d; at step %d the lr (first parameter group) is %.3g, %.3g on the old "
                   "schedule", saved["num_epoch"], solver.num_epoch,
                   solver.num_epoch * steps_per_epoch, step, group["lr"], old)


def _log_failure(err: BaseException, run_dir: Path) -> None:
    """A fatal error in train.log (the console has it already), and how to resume."""
    if isinstance(err, StopRequested):
        log_to_file(logging.WARNING, str(err))
    elif isinstance(err, UserError):
        log_to_file(logging.ERROR, f"{type(err).__name__}: {err}")
    else:
        log_to_file(logging.ERROR, f"training failed: {type(err).__name__}: {err}",
                    exc_info=(type(err), err, err.__traceback__))
    if (not isinstance(err, StopRequested)  # a stop says what to do next itself
            and "last.pth" not in str(err) and (run_dir / "last.pth").is_file()):
        logger.error("the last saved state is in %s; after fixing the cause, resume with: "
                     "%s --config_file %s resume=true", run_dir / "last.pth", comm.train_command(),
                     run_dir / CONFIG_NAME)


def metrics_file(run_dir: Path, checkpoint: Path) -> Path:
    """Where the test metrics of `checkpoint` go: test_metrics.json for the run's best.pth
    (what visualize.py reads), test_metrics_<name>.json for another checkpoint of the
    run folder, and test_metrics_<name>_<hash of its path>.json for one from elsewhere."""
    run_dir, checkpoint = Path(run_dir).resolve(), Path(checkpoint).resolve()
    if checkpoint == run_dir / "best.pth":
        return run_dir / "test_metrics.json"
    if checkpoint.is_relative_to(run_dir):
        name = checkpoint.relative_to(run_dir).with_suffix("").as_posix().replace("/", "_")
    else:
        digest = hashlib.sha1(str(checkpoint).encode("utf-8")).hexdigest()[:8]
        name = f"{checkpoint.stem}_{digest}"
    return run_dir / f"test_metrics_{name}.json"


def load_for_evaluation(cfg, checkpoint: Path, device: torch.device,
                        model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, int | None]:
    """The weights of `checkpoint` (this codebase's, or a best.pth of IRRA's code) in
    `model`, or in a model built from `cfg` and the checkpoint's shapes (model.pretrain
    is not read), on `device`; and the checkpoint's epoch (None when it has none)."""
    ckpt = load_checkpoint(checkpoint)
    if is_irra_state_dict(ckpt["model"]):
        ckpt = from_irra_checkpoint(ckpt, str(checkpoint))
    if model is None:
        model = build_model(cfg, num_classes=ckpt.get("num_classes"),
                            checkpoint_state=ckpt["model"]).to(device)
    load_model_state(model, ckpt, to_plain(cfg), source=str(checkpoint))
    return model, ckpt.get("epoch")


def evaluate_checkpoint(cfg, checkpoint: Path, model: torch.nn.Module, epoch: int | None,
                        dataset, device: torch.device, out_dir: Path, tb_writer=None) -> dict:
    """Evaluate `model`, holding the weights of `checkpoint` (of `epoch`), on the test
    split; print a table and write the metrics to `metrics_file(out_dir, checkpoint)`."""
    image_loader, text_loader = eval_loaders(cfg, dataset.test, device)
    result = evaluate(model, image_loader, text_loader, device, cfg.solver.precision,
                      i2t=cfg.eval.i2t, desc="test",
                      audit_samples=max(cfg.eval.audit_samples, QUICK_AUDIT_SAMPLES)
                      if cfg.eval.audit else QUICK_AUDIT_SAMPLES,
                      audit_tolerance=cfg.eval.audit_tolerance or None)
    result.update(checkpoint=str(checkpoint), split="test", epoch=epoch)
    if comm.is_main_process():
        path = metrics_file(out_dir, checkpoint)
        logger.info("test results of %s (in %s):\n%s", checkpoint, path, metrics_table(result))
        write_json(path, result)
        step = int(epoch or 0)  # the checkpoint's point on the val/ curves
        if tb_writer is not None:
            for task, prefix in (("t2i", "test/"), ("i2t", "test/i2t_")):
                for key, value in result.get(task, {}).items():
                    tb_writer.add_scalar(f"{prefix}{key}", value, step)
        log_expert_usage(tb_writer, result.get("experts"), step, prefix="test")
    return result


def run_test(cfg, config_file: str | Path) -> dict:
    """Rebuild the run from its config and evaluate a checkpoint on the test split: the
    run folder's best.pth, or checkpoint.path.

    The run folder is `run_folder_of(config_file, cfg)`. test.log and the metrics go
    there once the checkpoint, the dataset and the model have loaded, so a test that
    cannot start adds nothing.
    """
    device = resolve_device(cfg.device)
    comm.init_distributed(device)  # under torchrun the ranks share the encoding
    setup_logger(None, rank=comm.get_rank())  # records kept for test.log until it exists
    run_dir = run_folder_of(config_file, cfg)
    checkpoint = Path(cfg.checkpoint.path) if cfg.checkpoint.path else run_dir / "best.pth"
    if not checkpoint.is_file():
        existing = sorted(p.name for p in run_dir.glob("*.pth"))
        raise CheckpointError(
            f"{checkpoint} not found. "
            + (f"Checkpoints in {run_dir}: {', '.join(existing)}; pass one with "
               f"checkpoint=PATH." if existing else
               f"{run_dir} holds no checkpoint: has training finished a validation yet? "
               f"(checkpoint=PATH scores another one)"))
    set_seed(cfg.seed)
    configure_backends(cfg)
    dataset = load_dataset(cfg)
    logger.info("%s in %s:\n%s", cfg.dataset.name, cfg.dataset.root_dir, statistics_table(dataset))
    model, epoch = load_for_evaluation(cfg, checkpoint, device)
    if comm.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    setup_logger(run_dir, rank=comm.get_rank(), filename="test.log")
    try:
        result = evaluate_checkpoint(cfg, checkpoint, model, epoch, dataset, device, run_dir)
    except BaseException as err:  # test.log tells the whole story (the console has it already)
        if isinstance(err, (UserError, StopRequested)):
            log_to_file(logging.ERROR, f"{type(err).__name__}: {err}")
        else:
            log_to_file(logging.ERROR, f"test failed: {type(err).__name__}: {err}",
                        exc_info=(type(err), err, err.__traceback__))
        raise
    comm.cleanup()
    return result
