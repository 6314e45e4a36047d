"""`usjepa train`: one loop for stage 1 (MAE teacher) and stage 2 (SALT student).

The step index is also the data position: step k consumed batches 0..k-1, and a skipped
(non-finite) step still consumes its batch, so a resumed run draws exactly the batches,
augmentations and masks that the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from usjepa.config import Config
from usjepa.data.pipeline import make_train_loader, validation_batches
from usjepa.errors import UserError
from usjepa.ingest.manifest import load_manifest
from usjepa.models.predictor import Predictor, build_predictor
from usjepa.models.teacher import TeacherInfo, load_teacher
from usjepa.models.vit import Encoder, build_encoder
from usjepa.train import checkpoint as ckpt
from usjepa.train.health import feature_std, mask_overlay
from usjepa.train.objectives import pixel_targets, regression_loss, teacher_targets
from usjepa.train.rundir import prepare_run_dir
from usjepa.train.schedules import cosine, warmup_cosine


class Student(nn.Module):
    """The trainable parts; checkpoint keys are `encoder.*` and `predictor.*`."""

    def __init__(self, encoder: Encoder, predictor: Predictor):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float  # NaN when the step was skipped before the backward pass
    lr: float
    weight_decay: float
    tokens: torch.Tensor  # the student's context tokens, for health metrics

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class Meter:
    """Throughput and data-wait time since the last read."""

    def __init__(self) -> None:
        self.start = self.window_start = time.perf_counter()
        self.images = self.steps = 0
        self.data_seconds = 0.0

    def time_data(self, batches: Iterator[dict]) -> dict:
        t0 = time.perf_counter()
        batch = next(batches)
        self.data_seconds += time.perf_counter() - t0
        return batch

    def count(self, images: int) -> None:
        self.images += images
        self.steps += 1

    def read_and_reset(self) -> tuple[float, float, float]:
        """(images/s, seconds per step, data-wait seconds per step) over the window."""
        elapsed = time.perf_counter() - self.window_start
        steps = max(self.steps, 1)
        figures = (self.images / elapsed, elapsed / steps, self.data_seconds / steps)
        self.window_start, self.images, self.steps, self.data_seconds = time.perf_counter(), 0, 0, 0.0
        return figures

    def total_seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float
    images_per_s: float
    seconds: float


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={setting}: no CUDA device is visible; use run.device=cpu or auto")
    return device


def build_student(cfg: Config, out_dim: int, device: torch.device) -> Student:
    """Encoder and predictor; the attention backend is resolved for `device` here, so an
    explicit `model.attention=xformers` that cannot run fails before any training."""
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    encoder = build_encoder(cfg.model, cfg.data.image_size, device=device, dtype=dtype)
    predictor = build_predictor(cfg.predictor, cfg.model.embed_dim, out_dim, cfg.grid_size,
                                attention=cfg.model.attention, device=device, dtype=dtype)
    return Student(encoder, predictor)


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, tokens), the usual ViT recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


class StopSignal:
    """SIGTERM / SIGUSR2 / SIGINT ask the loop to finish its step, save and exit."""

    SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR2", None), signal.SIGINT) if s)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the host program
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir, drift = prepare_run_dir(cfg)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = resolve_device(cfg.run.device)
        self.manifest = load_manifest(cfg.data.shards)
        torch.manual_seed(cfg.run.seed)
        self.teacher: Encoder | None = None
        self.teacher_info: TeacherInfo | None = None
        if cfg.train.objective == "salt":
            self.teacher, self.teacher_info = load_teacher(cfg, self.device)
            out_dim = self.teacher_info.embed_dim
        else:
            out_dim = cfg.model.patch_size ** 2
        self.student = build_student(cfg, out_dim, self.device).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=cfg.optim.start_lr,
                                           betas=cfg.optim.betas)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.counters = {"nonfinite_skipped": 0, "corrupt_skipped": 0}  # run totals, kept across resumes
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            meta = ckpt.load_checkpoint(latest, self.student, self.optimizer)
            self._check_teacher(meta)
            ckpt.set_rng_state(meta["rng"])
            self.step = meta["step"]
            self.counters.update(meta.get("counters", {}))
            changed = f"; changed settings: {', '.join(drift)}" if drift else ""
            print(f"usjepa: resuming {self.run_dir} from step {self.step}{changed}", file=sys.stderr)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")

    def _check_teacher(self, meta: dict) -> None:
        saved = meta.get("teacher")
        now = self.teacher_info.as_dict() if self.teacher_info else None
        if saved and now and saved["sha256"] != now["sha256"]:
            raise UserError(f"{self.run_dir}: its checkpoints were trained against teacher {saved['source']} "
                            f"(sha256 {saved['sha256'][:12]}), not {now['source']} ({now['sha256'][:12]}); "
                            "restore teacher.checkpoint or start a new run.dir")

    # -- one step -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and the student's context tokens for one batch."""
        cfg = self.cfg
        images = batch["images"].to(self.device, non_blocking=True)
        context = batch["context"].to(self.device, non_blocking=True)
        targets = batch["targets"].to(self.device, non_blocking=True)
        with self.autocast:
            tokens = self.student.encoder(images, context)
            pred = self.student.predictor(tokens, context, targets)
        if cfg.train.objective == "salt":
            target = teacher_targets(self.teacher, images, targets, cfg.teacher.layernorm_targets)
        else:
            target = pixel_targets(images, cfg.model.patch_size, targets, cfg.train.norm_pix_targets)
        return regression_loss(pred, target, cfg.train), tokens

    def _set_schedules(self) -> tuple[float, float]:
        o, total = self.cfg.optim, self.cfg.train.total_steps
        lr = warmup_cosine(self.step, total, o.warmup_steps, o.start_lr, o.lr, o.final_lr)
        wd = cosine(self.step / total, o.weight_decay, o.final_weight_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        return lr, wd

    def _update(self) -> float:
        """Clip and step; returns the pre-clip grad norm (non-finite means nothing was applied)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over the validation split, or None when there is none to measure."""
        cfg = self.cfg
        if not cfg.train.validate or "val" not in self.manifest.splits or not self.manifest.count("val"):
            return None
        self.student.eval()
        total = count = 0.0
        for batch in validation_batches(cfg, self.manifest, max_batches=cfg.train.val_batches):
            loss, _ = self.forward(batch)
            total += loss.item() * batch["images"].shape[0]
            count += batch["images"].shape[0]
        self.student.train()
        return total / count

    def save(self, val_loss: float | None) -> Path:
        meta = {"samples_seen": self.step * self.cfg.data.batch_size, "data_position": self.step,
                "val_loss": val_loss, "counters": dict(self.counters), "rng": ckpt.rng_state(),
                "teacher": self.teacher_info.as_dict() if self.teacher_info else None, "time": time.time()}
        return ckpt.save_checkpoint(self.run_dir, self.step, self.student, self.optimizer, meta,
                                    self.cfg.checkpoint.keep_last)

    # -- the loop -----------------------------------------------------------------------------
    def train_step(self, batch: dict) -> StepOutcome:
        """Schedules, forward, backward, update; a non-finite loss or gradient updates nothing."""
        lr, wd = self._set_schedules()
        loss, tokens = self.forward(batch)
        outcome = StepOutcome(loss=loss.item(), grad_norm=math.nan, lr=lr, weight_decay=wd, tokens=tokens)
        if math.isfinite(outcome.loss):
            loss.backward()
            outcome.grad_norm = self._update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return outcome

    def _count_nonfinite(self, outcome: StepOutcome, writer: SummaryWriter) -> None:
        if outcome.finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.counters["nonfinite_skipped"] += 1
        writer.add_scalar("train/nonfinite_skipped", self.counters["nonfinite_skipped"], self.step)
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
            raise UserError(f"step {self.step}: loss or gradient not finite for {self.nonfinite_in_a_row} steps "
                            f"in a row (loss={outcome.loss}, grad norm={outcome.grad_norm}); the last checkpoint "
                            "is intact: lower optim.lr or check the data, then rerun")

    def _log(self, writer: SummaryWriter, outcome: StepOutcome, meter: Meter) -> None:
        images_per_s, step_time, data_wait = meter.read_and_reset()
        scalars = {"train/loss": outcome.loss, "train/lr": outcome.lr, "train/weight_decay": outcome.weight_decay,
                   "train/grad_norm": outcome.grad_norm, "perf/images_per_s": images_per_s,
                   "perf/step_time_s": step_time, "perf/data_wait_s": data_wait,
                   "health/feature_std": feature_std(outcome.tokens),
                   "data/corrupt_skipped": self.counters["corrupt_skipped"]}
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, self.step)

    def run(self) -> TrainResult:
        cfg = self.cfg
        end = min(cfg.run.stop_at_step or cfg.train.total_steps, cfg.train.total_steps)
        if self.step >= end:
            print(f"usjepa: {self.run_dir} is already at step {self.step}; nothing to do", file=sys.stderr)
            return TrainResult(self.run_dir, self.step, math.nan, 0.0, 0.0)
        batches = iter(make_train_loader(cfg, self.manifest, start_batch=self.step))
        bar = tqdm(total=end, initial=self.step, disable=not cfg.log.progress, desc=cfg.train.objective,
                   unit="step", dynamic_ncols=True)
        self.student.train()
        first_step, meter, outcome = self.step, Meter(), None
        with SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1 if self.step else None) as writer, \
                StopSignal() as stop:
            while self.step < end:
                batch = meter.time_data(batches)
                self.counters["corrupt_skipped"] += batch["corrupt"]
                outcome = self.train_step(batch)
                meter.count(batch["images"].shape[0])
                self._count_nonfinite(outcome, writer)
                if self.step % cfg.log.every_steps == 0 or self.step == end:
                    self._log(writer, outcome, meter)
                    bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{outcome.lr:.2e}")
                if cfg.log.image_every_steps and (self.step == 1 or self.step % cfg.log.image_every_steps == 0):
                    writer.add_image("masks/context_green_targets_red",
                                     mask_overlay(batch["images"], batch["context"], batch["targets"],
                                                  cfg.model.patch_size), self.step)
                bar.update(1)
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == end or stop.received:
                    val_loss = self.validate()
                    if val_loss is not None:
                        writer.add_scalar("val/loss", val_loss, self.step)
                    self.save(val_loss)
                if stop.received:
                    print(f"usjepa: signal {stop.received} received; saved step {self.step} and stopped",
                          file=sys.stderr)
                    break
        bar.close()
        seconds = meter.total_seconds()
        images = (self.step - first_step) * cfg.data.batch_size
        return TrainResult(self.run_dir, self.step, outcome.loss, images / seconds, seconds)


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).run()
