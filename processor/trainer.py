"""The training loop: steps, logging, validation, checkpoints and resume."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from datasets import BadImageError
from utils import comm
from utils.checkpoint import (CheckpointError, atomic_save, capture_rng_state,
                              load_model_state, restore_rng_state, rng_state_for_rank,
                              sweep_temporaries)
from utils.config import to_plain
from utils.errors import StopRequested, UserError
from utils.logger import Progress
from utils.meter import MeterDict
from utils.misc import autocast
from utils.signals import stop_signals_blocked

from .evaluator import evaluate, metrics_table

logger = logging.getLogger("comoe")


# Batch entries the model reads; the rest (e.g. skip flags) stay on the host.
MODEL_INPUTS = ("images", "caption_ids", "pids", "image_ids")


class NonFiniteLossError(UserError, RuntimeError):
    pass


class NonFiniteWeightsError(UserError, RuntimeError):
    """The weights themselves are nan/inf: they are never saved as a resumable state."""


# What a checkpoint needs to continue a run (best.pth-style weights are not enough).
RESUME_KEYS = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int,
               "batch_in_epoch": int, "global_step": int, "best_metric": float,
               "best_epoch": int, "rng": dict, "config": dict}


def check_resumable(ckpt: dict, source: str) -> None:
    """Raise CheckpointError unless `ckpt` holds everything `Trainer.resume` reads."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{source} cannot continue a run: it has no {', '.join(missing)} (it holds "
            f"{', '.join(sorted(map(str, ckpt)))}). resume=true needs a last.pth written by "
            f"train.py, which carries the optimizer, schedule, counters and RNG states.")
    wrong = [f"{k} is {type(ckpt[k]).__name__}" for k, kind in RESUME_KEYS.items()
             if not isinstance(ckpt[k], (int, float) if kind is float else kind)
             or isinstance(ckpt[k], bool)]
    if wrong:
        raise CheckpointError(f"{source} is damaged or not from train.py: {', '.join(wrong)}")


class Trainer:
    """Owns the objects of one run and the counters needed to resume it exactly.

    Counters: `epoch` (0-based, the epoch in progress), `batch_in_epoch` (batches
    of that epoch already trained) and `global_step` (optimizer steps so far).
    `validation_pending`: the epoch before `epoch` is trained and saved but not yet
    validated (last.pth is written before validation, so a crash in it loses no
    training, and a run resumed from there validates that epoch first).
    """

    def __init__(self, cfg, model: nn.Module, train_loader, val_loaders, optimizer, scheduler,
                 scaler, device: torch.device, run_dir: Path, num_classes: int | None = None,
                 tb_writer=None) -> None:
        self.cfg = cfg
        self.model = model
        self.core = model.module if hasattr(model, "module") else model
        self.train_loader = train_loader
        self.val_loaders = val_loaders
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.device = device
        self.run_dir = Path(run_dir)
        self.num_classes = num_classes
        self.tb = tb_writer
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.validation_pending = False
        self.nonfinite_steps = 0
        self.accumulation_steps = cfg.solver.accumulation_steps
        self._stop_signal: int | None = None
        self._saved_at: str | None = None  # where last.pth stands, for error messages
        # Fused optimizers can skip a step on the device; see `_step`.
        self.skip_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._bad_count: torch.Tensor | None = None  # device counters of skipped steps
        self._bad_step = self._bad_terms = None
        self._bad_keys: list[str] = []
        self._bad_reported = 0
        self._run_start: tuple[float, int] | None = None  # (time, global_step) of train()

    # -- checkpoints --------------------------------------------------------
    def state(self, rng_ranks: list[dict] | None = None) -> dict:
        """The full training state (last.pth): everything `resume` restores.

        `rng_ranks`: every rank's random state, in rank order, when several processes
        train (each draws its own dropout and MLM masks); "rng" is rank 0's.
        """
        state = {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "validation_pending": self.validation_pending,
            "nonfinite_steps": self.nonfinite_steps + self._unreported_nonfinite(),
            "num_classes": self.num_classes,
            "rng": capture_rng_state() if rng_ranks is None else rng_ranks[0],
            "config": to_plain(self.cfg),
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        return state

    def model_state(self, metrics: dict | None = None) -> dict:
        """What evaluating the model needs (best.pth): its weights, the config, the epoch,
        the number of identity classes and the validation metrics it was chosen on."""
        return {
            "model": self.core.state_dict(),
            "config": to_plain(self.cfg),
            "epoch": self.epoch,
            "num_classes": self.num_classes,
            "metrics": metrics,
        }

    def _unreported_nonfinite(self) -> int:
        return 0 if self._bad_count is None else int(self._bad_count) - self._bad_reported

    def _position(self) -> str:
        return f"epoch {self.epoch + 1}, batch {self.batch_in_epoch}, step {self.global_step}"

    def save(self, name: str, state: dict | None = None) -> Path | None:
        """Write `state` (default: the full training state) to run_dir/name atomically on
        rank 0, then remove temporary files that interrupted writes left there.
        Non-finite weights are refused on every rank (DDP keeps them equal), so all ranks
        stop together and last.pth keeps the last finite state."""
        self._check_finite_weights(name)
        path = self.run_dir / name
        rng_ranks = None
        if state is None and comm.get_world_size() > 1:  # every rank saves together
            rng_ranks = comm.all_gather_object(capture_rng_state(), host=True)
        if comm.is_main_process():
            atomic_save(self.state(rng_ranks) if state is None else state, path)
            sweep_temporaries(self.run_dir)
            logger.info("saved %s at step %d", path, self.global_step)
        if name == "last.pth":
            self._saved_at = self._position()
        return path if comm.is_main_process() else None

    def _check_finite_weights(self, name: str) -> None:
        tensors = {k: v for k, v in self.core.state_dict().items()
                   if v.is_floating_point() and v.numel()}
        # Each tensor's largest magnitude (one multi-tensor pass): nan or inf exactly when
        # one of its entries is.
        peaks = torch._foreach_norm(list(tensors.values()), float("inf"))
        finite = torch.isfinite(torch.stack([p.float() for p in peaks]))
        if bool(finite.all()):
            return
        bad = [k for k, ok in zip(tensors, finite.tolist()) if not ok]
        kept = (f"{self.run_dir / 'last.pth'} still holds the state of {self._saved_at}"
                if self._saved_at else "the run has no last.pth yet")
        raise NonFiniteWeightsError(
            f"the weights are not finite at {self._position()} ({len(bad)} tensors, e.g. "
            f"{bad[0]}), so {name} was not written ({kept}). Diverging weights usually mean "
            f"too large a learning rate (solver.lr={self.cfg.solver.lr}); a resumed run keeps "
            f"its lr, so start a new run (name=...) with a lower solver.lr or with "
            f"solver.grad_clip set.")

    def resume(self, ckpt: dict, source: str) -> None:
        """Continue from a checkpoint that passed `check_resumable`."""
        load_model_state(self.core, ckpt, to_plain(self.cfg), source=source)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = ckpt["epoch"]
        self.batch_in_epoch = ckpt["batch_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.best_metric = ckpt["best_metric"]
        self.best_epoch = ckpt["best_epoch"]
        self.validation_pending = bool(ckpt.get("validation_pending", False))
        self.nonfinite_steps = ckpt.get("nonfinite_steps", 0)
        restore_rng_state(rng_state_for_rank(ckpt, comm.get_rank(), comm.get_world_size(),
                                             self.cfg.seed))
        self._saved_at = self._position()
        logger.info("resumed from %s: %s, best val R1 %.2f%s", source, self._position(),
                    self.best_metric,
                    f"; validating epoch {self.epoch} first" if self.validation_pending else "")

    # -- signals ------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """Only note the signal: it can arrive inside a log call, and logging from here
        would re-enter it. A direct write to stderr says it was heard; train.log gets
        the stop when it is carried out."""
        self._stop_signal = signum
        note = f"\nreceived {signal.Signals(signum).name}: finishing the current step, then saving\n"
        try:
            os.write(sys.stderr.fileno(), note.encode())
        except (OSError, ValueError):  # no usable stderr
            pass

    def _install_signal_handlers(self):
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return previous

    # -- one step -----------------------------------------------------------
    def _forward_backward(self, batch: dict, sync: bool, weight: float
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Loss terms (and their sum, `loss`) and training accuracies of one
        (micro-)batch, the loss backpropagated with `weight` (its share of the step's batch).

        `sync=False` skips DDP's gradient all-reduce inside an accumulation group.
        Nothing here waits for the device; `_step` handles finiteness.
        """
        prepare = getattr(self.train_loader, "prepare_batch", None)
        if prepare is not None:  # e.g. batch-wise augmentation of cached uint8 images
            batch = prepare(batch, self.device, keys=MODEL_INPUTS)
        else:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                     if k in MODEL_INPUTS}
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if not sync and no_sync is not None else contextlib.nullcontext():
            with autocast(self.device, self.cfg.solver.precision):
                losses, metrics = self.model(batch, return_metrics=True)
            total = sum(losses.values())
            scaled = total * weight
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return {k: v.detach() for k, v in losses.items()} | {"loss": total.detach()}, metrics

    def _step(self, batch: dict
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over a loaded batch, in `accumulation_steps` micro-batches.

        Each micro-batch's loss counts by its share of the batch, so that for per-sample
        losses the step is the whole batch's, also when the batch does not split evenly
        (the last, smaller batch of an epoch under dataset.drop_last=false; one smaller
        than accumulation_steps gives one micro-batch per sample).

        Returns the micro-batch-averaged loss terms (weighted by size), a device flag,
        True when they and the gradients are finite, and the micro-batch-averaged
        training accuracies. A non-finite step makes no update. With a fused
        optimizer the skip happens on the device (the optimizer reads a `found_inf`
        flag, as under AMP loss scaling), so the step never waits for the device; the
        host learns of skipped steps at the next log line (`_check_nonfinite`).
        Otherwise the flag is read here, which costs nothing on the CPU.
        """
        totals: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        size = len(batch["pids"])
        parts = {k: v.tensor_split(self.accumulation_steps) for k, v in batch.items()}
        micro_batches = [micro for micro in ({k: p[i] for k, p in parts.items()}
                                             for i in range(self.accumulation_steps))
                         if len(micro["pids"])]
        for i, micro in enumerate(micro_batches):
            weight = len(micro["pids"]) / size
            losses, micro_metrics = self._forward_backward(micro, sync=i == len(micro_batches) - 1,
                                                           weight=weight)
            for sums, values in ((totals, losses), (metrics, micro_metrics)):
                for key, value in values.items():
                    sums[key] = sums[key] + value * weight if key in sums else value * weight
        finite = torch.isfinite(totals["loss"])
        if comm.get_world_size() > 1:  # every rank skips the same steps (queued, no wait)
            finite = finite.to(torch.int32)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            finite = finite.bool()
        if self.scaler is None:
            # A finite loss can still have a non-finite gradient (an overflow in backward);
            # stepping on it would put NaN in the weights. (The grad scaler checks this
            # itself.) Gradients are averaged over the ranks by now, so all ranks agree.
            finite = finite & torch.isfinite(self._clip_gradients())
        if self.skip_on_device:
            self._optimizer_step(finite)
            self._record_nonfinite(finite, totals)
        elif bool(finite):
            self._optimizer_step(None)
        else:
            self._nonfinite_now(totals)
        return totals, finite, metrics

    def _clip_gradients(self) -> torch.Tensor:
        """The total gradient norm (one multi-tensor pass), clipped to solver.grad_clip
        when that is set. On the device: no host sync. The norms are taken in fp32: with
        IRRA's fp16 weights the gradients are fp16, and a per-tensor norm above 65504
        would read as inf there and skip a finite step."""
        grads = [p.grad for p in self.core.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).norm()
        clip = self.cfg.solver.grad_clip
        if clip > 0:  # as torch.nn.utils.clip_grad_norm_ does, from the fp32 norm
            torch._foreach_mul_(grads, (clip / (total + 1e-6)).clamp(max=1.0))
        return total

    def _optimizer_step(self, finite: torch.Tensor | None) -> None:
        """Step and schedule (under fp16: unscale and clip first). `finite` (a device
        flag) skips the update when False."""
        if self.scaler is not None:
            if finite is not None:  # the scaler skips (and backs off) on a non-finite grad
                _poison_gradients(self.optimizer, finite)
            self.scaler.unscale_(self.optimizer)
            if self.cfg.solver.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.solver.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite is not None:
            # Fused AdamW/Adam leave parameters, moments and step counts untouched where
            # found_inf is non-zero (the protocol GradScaler uses).
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # -- non-finite steps -----------------------------------------------------
    def _record_nonfinite(self, finite: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """Count a (possibly) skipped step on the device, with its step and loss terms."""
        bad = ~finite
        terms = torch.stack([v.float() for v in losses.values()])
        if self._bad_count is None:
            self._bad_count = torch.zeros((), dtype=torch.long, device=bad.device)
            self._bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
            self._bad_terms = torch.zeros_like(terms)
            self._bad_keys = list(losses)
        first = bad & (self._bad_step < 0)  # the first since the last report
        self._bad_count += bad
        self._bad_step = torch.where(first, self.global_step, self._bad_step)
        self._bad_terms = torch.where(first, terms, self._bad_terms)

    def _check_nonfinite(self) -> None:
        """Read the device counters (a host sync: call it at log points only)."""
        new = self._unreported_nonfinite()
        if new <= 0:
            return
        self._bad_reported += new
        self.nonfinite_steps += new
        terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self._bad_keys, self._bad_terms.tolist()))
        step = int(self._bad_step)
        self._bad_step.fill_(-1)
        self._nonfinite_reached(step, terms, new)

    def _nonfinite_now(self, losses: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.nonfinite_steps += 1
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        self._nonfinite_reached(self.global_step, terms, 1)

    def _nonfinite_reached(self, step: int, terms: str, new: int) -> None:
        limit = self.cfg.solver.max_nonfinite_steps
        if self.nonfinite_steps <= limit:
            what = ("non-finite loss or gradient" if new == 1
                    else f"{new} non-finite losses or gradients, the first")
            logger.warning("%s at step %d (%s); skipped (%d of %d allowed)", what, step, terms,
                           self.nonfinite_steps, limit)
            return
        path = self.save("last.pth")
        more = f" ({new} non-finite steps from there to step {self.global_step - 1})" if new > 1 else ""
        raise NonFiniteLossError(
            f"non-finite loss or gradient at epoch {self.epoch + 1}, step {step}: {terms}{more}. "
            f"The last good state is in {path} (such steps make no update). Resume it "
            f"(resume=true) with solver.precision=fp32 or bf16, solver.grad_clip set, or skips "
            f"allowed by solver.max_nonfinite_steps=N; or start a new run with a lower "
            f"solver.lr (a resumed run keeps its lr).")

    # -- loop ---------------------------------------------------------------
    def train(self) -> None:
        """Train the remaining epochs. Each epoch ends by saving last.pth, then (when
        due) validating and saving again; a stop signal takes effect at the next step
        or right after one of these saves."""
        num_epoch = self.cfg.solver.num_epoch
        sampler = self.train_loader.batch_sampler
        if comm.is_main_process():
            sweep_temporaries(self.run_dir)
        previous_handlers = self._install_signal_handlers()
        self._run_start = (time.perf_counter(), self.global_step)
        try:
            while self.epoch < num_epoch or self.validation_pending:
                if not self.validation_pending:
                    self._train_epoch(sampler)
                    self.batch_in_epoch = 0
                    self.epoch += 1
                    self.validation_pending = self._validation_due()
                    self.save("last.pth")
                    self._leave_if_stop_requested()
                if self.validation_pending:
                    # Workers start with the stop signals blocked (see utils.signals).
                    with stop_signals_blocked():
                        self._validate()
                    self.save("last.pth")
                    self._leave_if_stop_requested()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _validation_due(self) -> bool:
        every, num_epoch = self.cfg.eval.period, self.cfg.solver.num_epoch
        return self.val_loaders is not None and (self.epoch % every == 0
                                                 or self.epoch == num_epoch)

    def _train_epoch(self, sampler) -> None:
        cfg = self.cfg
        sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        steps = len(self.train_loader) + self.batch_in_epoch
        meters = MeterDict()
        running: dict[str, torch.Tensor] = {}  # loss/accuracy sums since the last log line, on device
        running_steps = 0
        replaced_images = 0
        self.model.train()
        start = interval_start = time.perf_counter()
        epoch_samples = interval_samples = 0  # this rank's; every rank has as many
        data_wait = 0.0  # seconds this rank waited for the loader since the last log line
        progress = self._progress(steps)
        with stop_signals_blocked():  # workers start here (see utils.signals)
            batches = iter(self.train_loader)
        while True:
            bad_image = None
            wait_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break  # every rank has the same number of batches
            except BadImageError as err:
                bad_image = err
            finally:
                data_wait += time.perf_counter() - wait_start
            stop, any_bad = comm.any_rank(self._stop_signal is not None, bad_image is not None)
            if any_bad:
                self.save("last.pth")
                reason = (str(bad_image) if bad_image is not None
                          else "another rank could not read a training image (see its message)")
                raise BadImageError(getattr(bad_image, "path", ""), message=(
                    f"{reason}. Training stopped at epoch {self.epoch + 1}, batch "
                    f"{self.batch_in_epoch}; the state before this batch is saved to "
                    f"{self.run_dir / 'last.pth'}. Fix or remove the file (or set "
                    f"dataset.skip_bad_images=true), then resume with resume=true.")
                ) from bad_image
            if stop:
                self._stop(progress)
            if "replaced_images" in batch:
                replaced_images += int(batch["replaced_images"].sum())
            lr = self.optimizer.param_groups[0]["lr"]  # this step's; the step moves the schedule
            losses, finite, metrics = self._step(batch)
            epoch_samples += len(batch["pids"])
            interval_samples += len(batch["pids"])
            self.batch_in_epoch += 1
            self.global_step += 1  # skipped steps count too (their schedule step was taken)
            # Sums of finite steps only, kept on the device until the log line.
            for key, value in (losses | metrics).items():
                value = torch.where(finite, value, 0.0)
                running[key] = running[key] + value if key in running else value
            running_steps = running_steps + finite.long()
            if self.global_step % cfg.solver.log_period == 0 or self.batch_in_epoch == steps:
                self._check_nonfinite()
                count = int(running_steps)
                now = time.perf_counter()  # the reads above waited for the device
                interval = max(now - interval_start, 1e-9)
                speed = {"samples_per_s": interval_samples * comm.get_world_size() / interval,
                         "data_wait": min(data_wait / interval, 1.0)}
                if count:
                    values = {k: v / count for k, v in _mean_over_ranks(running).items()}
                    meters.update(values, count)
                    self._log_step(values, list(metrics), steps, lr, **speed)
                running, running_steps = {}, 0
                interval_start, interval_samples, data_wait = now, 0, 0.0
            progress.update(1)
            every = cfg.checkpoint.every_n_steps
            if every and self.global_step % every == 0 and self.batch_in_epoch < steps:
                self.save("last.pth")
        progress.close()
        elapsed = time.perf_counter() - start
        logger.info("epoch %d/%d done in %.1fs (%.1f samples/s): %s", self.epoch + 1,
                    cfg.solver.num_epoch, elapsed,
                    epoch_samples * comm.get_world_size() / max(elapsed, 1e-9), meters)
        if replaced_images:
            logger.warning("epoch %d: %d unreadable training images were skipped (replaced by "
                           "another image of the same identity); see the warnings above for "
                           "their paths", self.epoch + 1, replaced_images)

    def _stop(self, progress) -> None:
        """A stop signal reached some rank: save and leave, all ranks together."""
        self.save("last.pth")
        if progress is not None:
            progress.close()
        self._leave()

    def _leave_if_stop_requested(self) -> None:
        """At an epoch end, right after last.pth was saved."""
        if comm.any_rank(self._stop_signal is not None)[0]:
            self._leave()

    def _leave(self) -> None:
        # Another rank may have been signalled instead: report SIGTERM then.
        signum = self._stop_signal or signal.SIGTERM
        pending = (f" (the validation of epoch {self.epoch} runs first when resumed)"
                   if self.validation_pending else "")
        raise StopRequested(
            f"stopped by {signal.Signals(signum).name} at {self._position()}; state saved to "
            f"{self.run_dir / 'last.pth'}{pending}. Resume with: {comm.train_command()} "
            f"--config_file {self.run_dir / 'configs.yaml'} resume=true", signum)

    def _progress(self, steps: int) -> Progress:
        return Progress(steps, f"epoch {self.epoch + 1}/{self.cfg.solver.num_epoch}",
                        initial=self.batch_in_epoch, rank=comm.get_rank())

    def _eta(self, steps_per_epoch: int) -> str:
        """Time left for the whole run (validations included) at the pace of this
        process so far, as H:MM:SS."""
        start_time, start_step = self._run_start
        done = self.global_step - start_step
        left = self.cfg.solver.num_epoch * steps_per_epoch - self.global_step
        seconds = (time.perf_counter() - start_time) / max(done, 1) * max(left, 0)
        return str(datetime.timedelta(seconds=round(seconds)))

    def _log_step(self, values: dict[str, float], metric_names: list[str], steps: int,
                  lr: float, samples_per_s: float, data_wait: float) -> None:
        """A log line: the lr the last step used, loss terms, training accuracies (if
        any), then since the last line the throughput (all ranks, data loading
        included) and the share of the time rank 0 waited for the data loader (high:
        the loader is the bottleneck), on CUDA this process's peak allocated memory,
        and the run's ETA."""
        speed = f"{samples_per_s:.1f} samples/s, data wait {data_wait:.0%}"
        memory = None
        if self.device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(self.device) / 2**30
            speed += f", {memory:.2f} GiB peak"
        speed += f", eta {self._eta(steps)}"
        terms = [" ".join(f"{k}={v:.4f}" for k, v in values.items() if k not in metric_names),
                 " ".join(f"{k}={values[k]:.4f}" for k in metric_names), speed]
        logger.info("epoch %d [%d/%d] step %d lr %.2e %s", self.epoch + 1, self.batch_in_epoch,
                    steps, self.global_step, lr, " | ".join(t for t in terms if t))
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, self.global_step)
            self.tb.add_scalar("train/lr", lr, self.global_step)
            self.tb.add_scalar("train/samples_per_s", samples_per_s, self.global_step)
            self.tb.add_scalar("train/data_wait", data_wait, self.global_step)
            if memory is not None:
                self.tb.add_scalar("train/peak_memory_gib", memory, self.global_step)

    def _validate(self) -> None:
        image_loader, text_loader = self.val_loaders
        result = evaluate(self.model, image_loader, text_loader, self.device,
                          self.cfg.solver.precision, desc=f"epoch {self.epoch} validation")
        self.validation_pending = False
        if not comm.is_main_process():
            return
        r1 = result["t2i"]["R1"]
        best = r1 > self.best_metric
        logger.info("epoch %d validation (%s):\n%s", self.epoch, "new best R1" if best else
                    f"best: R1 {self.best_metric:.2f} at epoch {self.best_epoch}",
                    metrics_table(result))
        if self.tb is not None:
            for key, value in result["t2i"].items():
                self.tb.add_scalar(f"val/{key}", value, self.epoch)
            log_expert_usage(self.tb, result.get("experts"), self.epoch, prefix="val")
        if best:
            self.best_metric, self.best_epoch = r1, self.epoch
            self.save("best.pth", self.model_state({"split": "val", "t2i": result["t2i"]}))


def log_expert_usage(tb, experts: dict | None, step: int, prefix: str) -> None:
    """Expert usage and entropy per layer in TensorBoard. Layers are numbered from 1
    and experts from 0, as in the figures of utils/visualization.py."""
    if tb is None or not experts:
        return
    for modality, summary in experts.items():
        for layer, (usage, entropy) in enumerate(zip(summary["usage"], summary["entropy"]),
                                                 start=1):
            tb.add_scalar(f"{prefix}/experts/{modality}_entropy_layer{layer}", entropy, step)
            for expert, share in enumerate(usage):
                tb.add_scalar(f"{prefix}/experts/{modality}_layer{layer}_expert{expert}", share,
                              step)


def _mean_over_ranks(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss sums averaged over ranks (one all-reduce per log line under torchrun).

    SDM, ITC and CoAR already see the global batch; ID and MLM are per-rank means, so
    the log shows what one process with the whole batch would.
    """
    keys = list(sums)
    stacked = torch.stack([sums[k].float() for k in keys])
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(stacked)
        stacked /= comm.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def _poison_gradients(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Make one gradient entry inf where `finite` is False, so a GradScaler skips the step.

    Adds 0 otherwise; queued on the device like the rest of the step.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                flat = param.grad.view(-1)[:1]
                flat.add_(torch.where(finite, 0.0, float("inf")).to(flat.dtype))
                return


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
