"""The training loop: one :class:`Trainer` for every task (language model, datacube surrogate).

Per optimizer step: ``batch_size / (micro_batch_size * dp)`` micro-batches are run forward under
autocast and backward (loss divided by the accumulation count, scaled for fp16); a NaN/inf loss
skips the step; gradients are unscaled and clipped; AdamW (fused where available) steps; the
warm-up + cosine scheduler steps; callbacks run; metrics are logged; every ``eval_every`` steps the
task evaluates; every ``save_every`` steps a checkpoint is written (:mod:`sapwood.train.checkpoint`).

The model is built in one place, :func:`build_model`: on the meta device, then
:func:`sapwood.train.parallel.apply_training_parallelism` (the single hook that applies pipeline
split, tensor parallel, activation checkpointing, compile per block and FSDP2 from
``config.parallel``, for one process too), then materialized with ``to_empty`` and initialized. The
trainer holds the result, a :class:`~sapwood.train.parallel.ParallelModel`, as ``parallel``: under
pipeline parallelism its schedule runs forward and backward with the task's ``output_loss``, and
evaluation calls it like the model (the whole pipeline's forward). What the trainer exposes to
callbacks: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``config`` (current; ``config.model``
is the current shape), ``step``, ``log_event(event, **fields)``, ``model_changed()``, ``out_dir``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sapwood import fsutil
from sapwood.config import Config
from sapwood.data.loader import DeviceFeed
from sapwood.errors import ConfigError, SapwoodError, SapwoodWarning
from sapwood.model import save_folder
from sapwood.model.folder import materialize
from sapwood.model.transformer import check_fused_attention
from sapwood.train import checkpoint as ckpt
from sapwood.train.activation import apply_activation_checkpointing
from sapwood.train.callbacks import Callback, callbacks_from_config
from sapwood.train.console import say
from sapwood.train.device_stats import MfuMeter, cuda_memory_report
from sapwood.train.interrupt import StopState, TrainingInterrupted, protected, stop_on_ctrl_c
from sapwood.train.mesh import init_distributed, parallel_dims_for
from sapwood.train.metrics import EventLog, last_logged, plot_loss
from sapwood.train.optim import OptimizerInBackward, SchedulerGroup, check_memory_options
from sapwood.train.optim import build_optimizer as build_train_optimizer
from sapwood.train.parallel import (
    ParallelModel,
    apply_compile,
    apply_training_parallelism,
    clip_grad_norm_,
    full_model_state,
)
from sapwood.train.precision import DTYPES, Precision, cast_parameters
from sapwood.train.schedule import warmup_cosine
from sapwood.train.task import PipelinedTask, Task, build_task


class DivergenceError(SapwoodError):
    """The loss was NaN/inf for ``max_bad_steps`` consecutive steps."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(task: Task, config: Config, device: torch.device) -> ParallelModel:
    """Meta device -> :func:`~sapwood.train.parallel.apply_training_parallelism` (every layout, one
    process included: pipeline split, tensor parallel, activation checkpointing, compile per block,
    FSDP2) -> materialize on ``device`` -> ``init_weights`` (seeded by the caller)."""
    with torch.device("meta"):
        model = task.build_model(config)
    loss_fn = task.output_loss if isinstance(task, PipelinedTask) else None
    parallel = apply_training_parallelism(model, config, device, loss_fn)
    for part in parallel.parts:
        materialize(part, device)
        if config.train is not None and config.train.precision == "bf16-pure":
            cast_parameters(part, DTYPES["bf16-pure"])
    return parallel


def build_optimizer(model: nn.Module, config: Config, device: torch.device):
    """The optimizer ``config.train`` asks for (:func:`sapwood.train.optim.build_optimizer`)."""
    return build_train_optimizer(model, config.train, device)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):  # no torch call when it is there: each one may hand the GIL away
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def check_task_parallelism(config: Config) -> None:
    """One-line :class:`ConfigError` for a task whose model the tensor / pipeline split cannot take."""
    par = config.parallel
    if getattr(config, "cube", None) is not None and (par.tp > 1 or par.pp > 1):
        raise ConfigError(
            f"parallel.tp={par.tp}, pp={par.pp}: the cube surrogate trains with data parallelism "
            "only (dp_shard / dp_replicate); set tp: 1 and pp: 1"
        )


class Trainer:
    """Trains ``config.model`` on ``config.train.task`` with ``config.train`` settings.

    ``resume=True`` continues from the newest complete checkpoint in ``OUT/checkpoints`` (its
    config's model shape wins over the YAML's); without one it starts fresh with a warning.
    """

    def __init__(self, config: Config, callbacks: Sequence[Callback] = (), resume: bool = False):
        if config.train is None:
            raise ConfigError("config has no train section; add train: {steps: N, ...}")
        check_task_parallelism(config)
        self.config = config.model_copy(deep=True)
        self.callbacks = list(callbacks)
        self.device = resolve_device(self.config.train.device)
        dist_env = init_distributed(self.device.type)  # from torchrun's env; no-op for one process
        if self.device.type == "cuda":
            self.device = dist_env.device
        self.rank, self.world_size = ckpt.rank_and_world()
        self.dims = parallel_dims_for(self.config.parallel, self.device.type)
        self.out_dir = Path(self.config.train.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.events = EventLog(
            self.out_dir / "metrics.jsonl",
            enabled=self.rank == 0,
            tensorboard_dir=self.out_dir / "tensorboard" if self.config.train.tensorboard else None,
        )
        dp = self.config.parallel.dp if self.world_size > 1 else 1
        per_step = self.config.train.micro_batch_size * dp
        if self.config.train.batch_size % per_step:
            raise ConfigError(
                f"train.batch_size={self.config.train.batch_size} is not divisible by micro_batch_size x dp "
                f"= {per_step}"
            )
        self.accumulation = self.config.train.batch_size // per_step
        check_memory_options(self.config.train, self.world_size)
        self.precision = Precision(self.config.train.precision, self.device.type)
        if (
            self.precision.name == "bf16"
            and self.device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise ConfigError("train.precision='bf16' is not supported on this GPU; use fp16 or fp32")
        self.task = build_task(self.config)
        self.mfu = self._gpu_checks()
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.overflow_steps = 0
        self.last_checkpoint: Path | None = None
        self.parallel: ParallelModel
        self._build(self.config)
        if resume:
            self._resume()
        elif ckpt.list_checkpoints(self.checkpoint_dir):
            raise SapwoodError(
                f"{self.checkpoint_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                "or choose another train.out_dir"
            )
        elif self.rank == 0 and self.events.path.exists():
            self.events.path.unlink()  # metrics of an earlier run that never checkpointed

    def _gpu_checks(self) -> MfuMeter | None:
        """On CUDA, for a language model: the attention kernel must be a fused one at the trained
        sequence length (one-line error otherwise); returns the MFU meter for the training logs."""
        if self.device.type != "cuda" or getattr(self.config, "cube", None) is not None:
            return None
        seq = (
            self.config.data.seq_len if self.config.data is not None else None
        ) or self.config.model.trained_context
        dtype = torch.float32 if self.precision.name == "fp32" else self.precision.dtype
        check_fused_attention(self.config.model, seq, dtype, self.device)
        return MfuMeter(self.config.model, seq, torch.cuda.get_device_name(self.device), self.precision.name)

    def gpu_metrics(self, units_per_s: float) -> dict[str, float]:
        """MFU per GPU and the allocator's memory (peak GB, fragmentation) on CUDA; nothing elsewhere."""
        if self.device.type != "cuda":
            return {}
        out = cuda_memory_report(self.device)
        mfu = self.mfu(units_per_s / self.world_size) if self.mfu is not None else None
        if mfu is not None:
            out["mfu"] = mfu
        return out

    # --- state -------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The model this rank trains: the whole model, or its pipeline stage (``self.parallel``
        holds it with the schedule that steps it)."""
        return self.parallel.model

    @model.setter
    def model(self, module: nn.Module) -> None:
        self.parallel.model = module

    def _build(self, config: Config) -> None:
        """(Re)build model, optimizer, scheduler, scaler and data for ``config`` at step 0."""
        self.config = config
        seed_everything(config.train.seed)
        self.parallel = build_model(self.task, config, self.device)
        self.optimizer = build_optimizer(self.model, config, self.device)
        t = config.train
        if isinstance(self.optimizer, OptimizerInBackward):
            self.scheduler = SchedulerGroup([warmup_cosine(o, t.lr, t.min_lr, t.warmup_steps, t.steps)
                                             for o in self.optimizer.optimizers])
        else:
            self.scheduler = warmup_cosine(self.optimizer, t.lr, t.min_lr, t.warmup_steps, t.steps)
        self.scaler = self.precision.grad_scaler(distributed=self.world_size > 1)
        self.batches = DeviceFeed(
            self.task.train_batches(t.micro_batch_size, self.dims.dp_rank, self.dims.dp), self.device
        )  # on CUDA: the copy of the next batch overlaps this step
        self.data_wait_total_s = self.step_total_s = 0.0  # over the steps this process trained

    def model_changed(self) -> None:
        """Call after replacing blocks/parameters: activation checkpointing and compile reach new blocks."""
        t = self.config.train
        apply_activation_checkpointing(self.model, t.activation_checkpointing, t.checkpoint_every_k)
        if t.compile:
            apply_compile(self.model)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(), "data": self.batches.state_dict(),
            "counters": {"skipped_steps": self.skipped_steps, "overflow_steps": self.overflow_steps},
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def save(self) -> Path:
        """Write a training checkpoint for the current step (collective); no Ctrl-C cuts it."""
        with protected():
            self.last_checkpoint = ckpt.save_checkpoint(
                self.checkpoint_dir, self.step, self.model, self._checkpointed_optimizer(),
                self.trainer_state(), self.config, self.config.train.keep_checkpoints,
            )
            self.log_event("checkpoint", path=str(self.last_checkpoint))
        return self.last_checkpoint

    def _checkpointed_optimizer(self):
        """What torch.distributed.checkpoint saves: the optimizer, or every per-parameter one."""
        if isinstance(self.optimizer, OptimizerInBackward):
            return self.optimizer.optimizers
        return self.optimizer

    def _resume(self) -> None:
        candidates = ckpt.resume_candidates(self.checkpoint_dir)
        if not candidates:
            say(
                f"--resume: nothing to resume, no complete checkpoint in {self.checkpoint_dir}; starting "
                f"from step 0",
                self.rank,
            )
            return
        for folder in candidates:
            try:
                saved = ckpt.checkpoint_config(folder)
                config = self.config.model_copy(update={"model": saved.model})
                for name in type(saved).model_fields:  # sections owned by callbacks (e.g. growth)
                    if (
                        name not in ("model", "train", "data", "parallel")
                        and getattr(saved, name) is not None
                    ):
                        config = config.model_copy(update={name: getattr(saved, name)})
                if config.model != self.config.model:
                    self._build(config)
                self.config = config
                with protected():  # a Ctrl-C inside the read must not make a good checkpoint look damaged
                    state = ckpt.load_checkpoint(folder, self.model, self._checkpointed_optimizer())
            except ckpt.CheckpointDamaged as exc:  # damaged in a way the manifest did not catch
                warnings.warn(f"skipping checkpoint {folder}: {exc}", SapwoodWarning, stacklevel=2)
                self._build(self.config)
                continue
            self._apply_trainer_state(state)
            self.last_checkpoint = folder
            self.log_event("resume", path=str(folder))
            say(f"resumed from step {self.step} of {self.config.train.steps} ({folder})", self.rank)
            return
        say("--resume: every checkpoint was unusable; starting from step 0", self.rank)

    def _apply_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        self.skipped_steps = state["counters"]["skipped_steps"]
        self.overflow_steps = state["counters"]["overflow_steps"]
        for cb in self.callbacks:
            if cb.name in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.name])
        ckpt.set_rng_state(state["rng"])

    def log_event(self, event: str, **fields: Any) -> dict[str, Any]:
        return self.events.write(event, self.step, **fields)

    # --- steps -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics (``skipped`` True when the loss was not finite), with
        ``step_s``, its seconds, ``data_wait_s``, the seconds it waited for its batches, and
        ``data_wait_fraction`` of the step."""
        start = time.perf_counter()
        self._data_wait = 0.0
        metrics = self._train_step()
        elapsed = time.perf_counter() - start
        self.data_wait_total_s += self._data_wait
        self.step_total_s += elapsed
        metrics.update(
            step_s=elapsed, data_wait_s=self._data_wait,
            data_wait_fraction=self._data_wait / elapsed if elapsed > 0 else 0.0,
        )
        return metrics

    def _next_batch(self) -> Any:
        tick = time.perf_counter()
        batch = _to_device(next(self.batches), self.device)
        self._data_wait += time.perf_counter() - tick
        return batch

    def _train_step(self) -> dict[str, Any]:
        t = self.config.train
        self.parallel.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        units = 0
        extra: dict[str, float] = {}
        in_backward = isinstance(self.optimizer, OptimizerInBackward)
        for index in range(self.accumulation):
            batch = self._next_batch()
            units += self.task.count_units(batch)
            if (
                self.parallel.pipelined
            ):  # the schedule runs backward itself: scale its loss as the scaler would
                scale = float(self.scaler.scale(torch.ones((), device=self.device)))  # 1 unless fp16
                inputs, targets = self.task.split_batch(batch)
                with self.precision.autocast():
                    loss = self.parallel.forward_backward(
                        inputs, targets, loss_scale=scale / self.accumulation
                    )
                metrics = {}
            elif in_backward:
                with self.precision.autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                if torch.isfinite(loss):  # the last backward updates the weights: never with NaN gradients
                    with self.optimizer.stepping(index == self.accumulation - 1):
                        (loss / self.accumulation).backward()
            else:
                with self.precision.autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                self.scaler.scale(loss / self.accumulation).backward()
            total += loss.detach().float() / self.accumulation
            for key, value in metrics.items():
                extra[key] = extra.get(key, 0.0) + float(value) / self.accumulation
        loss_value = float(self._mean_across_ranks(total))
        lr = float(self.optimizer.param_groups[0]["lr"])
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            self.scheduler.step()
            self.step += 1
            return {"loss": loss_value, "skipped": True, "lr": lr, "units": units * self.dims.dp, **extra}
        self.bad_steps = 0
        if in_backward:  # every parameter already stepped in backward and its gradient is freed
            self.scheduler.step()
            self.step += 1
            return {"loss": loss_value, "lr": lr, "units": units * self.dims.dp, **extra}
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = t.grad_clip if t.grad_clip is not None else float("inf")
        grad_norm = float(clip_grad_norm_(params, max_norm, self.dims))
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        overflow = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        if overflow:
            self.overflow_steps += 1
        self.scheduler.step()
        self.step += 1
        out = {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, "units": units * self.dims.dp, **extra}
        if self.scaler.is_enabled():
            out.update(overflow=overflow, scale=self.scaler.get_scale())
        return out

    def _mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return value

    def evaluate(self) -> dict[str, float]:
        self.parallel.eval()
        with torch.no_grad(), self.precision.autocast():
            metrics = self.task.evaluate(self.parallel, self.config.train.micro_batch_size,
                                         self.config.train.eval_batches)
        self.parallel.train()
        return metrics

    # --- the run -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; evaluate, checkpoint, write ``final/`` and ``loss.png``.

        Returns a summary: final step, last train loss, last eval metrics, counters, paths, and
        ``data_wait_fraction``, the time the steps of this process waited for their batches over the time
        they took. Ctrl-C: see
        :mod:`sapwood.train.interrupt`; the run stops before its next step with :class:`TrainingInterrupted`.
        """
        with _stop_on_ctrl_c(self) as stop:
            return self._fit(stop)

    def _fit(self, stop: StopState) -> dict[str, Any]:
        t = self.config.train
        if self.step == 0:
            self.log_event("start", config=self.config.model_dump(mode="json", exclude_none=True))
        for cb in self.callbacks:
            cb.on_train_start(self)
        last_loss, last_eval = last_logged(self.events.path) if self.step else (float("nan"), {})
        if self.step >= t.steps:
            say(f"the run already finished at step {self.step} (train.steps={t.steps}); nothing to train. "
                "Raise train.steps to train further.", self.rank)
        progress = _Progress(
            t.steps, self.step, enabled=t.progress and self.rank == 0 and self.step < t.steps,
            unit=getattr(self.task, "unit_name", "tok"),
        )
        window_units, window_start = 0, time.perf_counter()
        with progress:
            while self.step < t.steps:
                if (
                    stop.requested
                ):  # a Ctrl-C: stop at this safe point, after the last step and its checkpoint
                    raise KeyboardInterrupt
                metrics = self.train_step()
                window_units += metrics["units"]
                elapsed = time.perf_counter() - window_start
                metrics["units_per_s"] = window_units / elapsed if elapsed > 0 else 0.0
                metrics.update(self.gpu_metrics(metrics["units_per_s"]))
                if metrics.get("skipped"):
                    self.log_event("skip", loss=str(metrics["loss"]), bad_steps=self.bad_steps)
                    if self.bad_steps >= t.max_bad_steps:
                        where = self.last_checkpoint or "none written yet"
                        self.log_event("diverged", bad_steps=self.bad_steps)
                        raise DivergenceError(
                            f"training diverged: loss was NaN/inf for {self.bad_steps} consecutive steps "
                            f"(at step {self.step}); last good checkpoint: {where}; lower train.lr or use "
                            f"fp32/bf16"
                        )
                else:
                    last_loss = metrics["loss"]
                    if metrics.get("overflow"):
                        self.log_event("overflow", scale=metrics["scale"], overflow_steps=self.overflow_steps)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, metrics)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.log_event("train", **{k: v for k, v in metrics.items() if k not in ("skipped",)})
                    window_units, window_start = 0, time.perf_counter()
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    last_eval = self.evaluate()
                    self.log_event("eval", **last_eval)
                if self.bad_steps == 0 and (self.step % t.save_every == 0 or self.step == t.steps):
                    self.save()
                progress.update(self.step, last_loss, metrics["units_per_s"], last_eval.get("val_loss"))
        for cb in self.callbacks:
            cb.on_train_end(self)
        final = self.write_final()
        plot = None
        if self.rank == 0:
            baseline = getattr(self.task, "unigram_baseline", lambda: None)()
            plot = plot_loss(self.events.path, self.out_dir / "loss.png", baseline)
        summary = {
            "step": self.step, "loss": last_loss, **last_eval, "skipped_steps": self.skipped_steps,
            "overflow_steps": self.overflow_steps, "final": str(final), "plot": str(plot) if plot else None,
            "data_wait_fraction": self.data_wait_total_s / self.step_total_s if self.step_total_s else 0.0,
        }
        self.log_event("done", **{k: v for k, v in summary.items() if k != "step"})
        self.events.close()
        return summary

    def write_final(self) -> Path:
        """The final weights as a normal sapwood checkpoint folder ``OUT/final`` (rank 0 writes)."""
        state = full_model_state(self.parallel)
        out = self.out_dir / "final"
        if self.rank == 0:
            with torch.device("meta"):
                plain = self.task.build_model(self.config)
            materialize(plain, "cpu").load_state_dict(state)
            save_final = getattr(self.task, "save_final", None)  # a task with its own final folder (sft)
            with protected():
                if save_final is None:
                    save_folder(plain, self.config, out, tokenizer_file=self.task.tokenizer_file())
                else:
                    with fsutil.staged_dir(out) as staged:
                        save_final(plain, self.config, staged)
        ckpt.barrier()
        return out


@contextlib.contextmanager
def _stop_on_ctrl_c(trainer: Trainer) -> Iterator[StopState]:
    """The run under :func:`sapwood.train.interrupt.stop_on_ctrl_c`: a Ctrl-C that stops it (the loop acting
    on a request, or a second Ctrl-C) becomes :class:`TrainingInterrupted`, logged to metrics.jsonl."""
    with stop_on_ctrl_c() as stop:
        try:
            yield stop
        except KeyboardInterrupt:
            trainer.log_event("interrupted", last_checkpoint=str(trainer.last_checkpoint))
            raise TrainingInterrupted(trainer.step, trainer.last_checkpoint,
                                      trainer.config.train.save_every) from None


class _Progress:
    """A rich progress bar: step, loss, units (tokens, samples) per second, ETA; silent when disabled."""

    def __init__(self, total: int, start: int, enabled: bool, unit: str = "tok"):
        self.enabled = enabled
        self.unit = unit
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task_id = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, units_per_s: float, val_loss: float | None) -> None:
        if self.enabled:
            info = f"loss {loss:.3f}  {units_per_s:,.0f} {self.unit}/s" + (
                f"  val {val_loss:.3f}" if val_loss is not None else "")
            self.bar.update(self.task_id, completed=step, info=info)


def train(config: Config, callbacks: Sequence[Callback] = (), resume: bool = False) -> dict[str, Any]:
    """Build a :class:`Trainer` with ``callbacks`` plus those the config's sections ask for
    (:func:`sapwood.train.callbacks.callbacks_from_config`), run it to the end; return its summary.

    From its first line a Ctrl-C is a stop request (:mod:`sapwood.train.interrupt`); one that stops the run
    raises :class:`TrainingInterrupted`, naming the newest complete checkpoint."""
    with stop_on_ctrl_c():
        try:
            trainer = Trainer(config, [*callbacks, *callbacks_from_config(config)], resume)
        except KeyboardInterrupt:  # a second Ctrl-C while the run was built or resumed
            raise _interrupted_before_training(config) from None
        return trainer.fit()


def _interrupted_before_training(config: Config) -> TrainingInterrupted:
    if config.train is None:
        return TrainingInterrupted(None, None, None)
    root = Path(config.train.out_dir) / "checkpoints"
    newest = next((f for f in ckpt.list_checkpoints(root) if ckpt.checkpoint_problem(f) is None), None)
    return TrainingInterrupted(None, newest, config.train.save_every)
