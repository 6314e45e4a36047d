"""`usjepa train`: one loop for stage 1 (MAE teacher), stage 2 (SALT student) and the
I-JEPA baseline (EMA target), on one process or many (torchrun, srun).

The step index is also the data position: step k consumed the batches of steps 0..k-1, and a
skipped (non-finite) step still consumes its batch, so a resumed run draws exactly the
batches, augmentations and masks that the uninterrupted run would have drawn, whatever the
world size (see data/streams.py). Each rank computes its share of the global batch, in
micro-batches when `data.micro_batch_size` asks for it, and the loss of every micro-batch is
weighted by its share of the global batch's samples, so the gradient is that of the global
mean loss on 1 rank or N.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from usjepa.config import Config
from usjepa.data.masks import mask_lengths
from usjepa.data.pipeline import collate_batch, make_train_loader, validation_batch_count, validation_batches
from usjepa.data.streams import ShardSet
from usjepa.errors import UserError
from usjepa.models.predictor import Predictor, build_predictor
from usjepa.models.teacher import TeacherInfo, load_teacher
from usjepa.models.vit import Encoder, build_encoder
from usjepa.rundir import (
    cannot_write,
    has_checkpoints,
    refuse_unresumable,
    resolve_device,
    resume_checkpoint,
    run_drift,
    write_resolved_config,
)
from usjepa.signals import KEPT_IF_IGNORED, STOP_SIGNALS
from usjepa.train import checkpoint as ckpt
from usjepa.train.distributed import barrier, shutdown_distributed
from usjepa.train.ema import ema_update, make_target
from usjepa.train.flops import batch_flops, peak_tflops
from usjepa.train.health import feature_std, mask_overlay, rankme
from usjepa.train.meter import Meter, module_gib, peak_memory_gib
from usjepa.train.objectives import latent_targets, pixel_targets, regression_loss
from usjepa.train.parallel import (
    World,
    as_float,
    micro_batches_per_step,
    prepare_student,
    prepare_target,
    reshard_target,
    set_gradient_sync,
    split_sizes,
)
from usjepa.train.provenance import record_start
from usjepa.train.runlock import hold_run_dir
from usjepa.train.schedules import cosine, ema_momentum, warmup_cosine
from usjepa.train.tblog import EventWriter, drop_steps_after


class Student(nn.Module):
    """The trainable parts; checkpoint keys are `encoder.*` and `predictor.*`."""

    def __init__(self, encoder: Encoder, predictor: Predictor):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, images: torch.Tensor, masks: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context tokens [B, Kc, D] for health metrics, predictions [T*B, Kt, out_dim]) for
        the collated `masks` (context, targets and their valid flags); without masks, (tokens
        of every patch, None): the features a probe sees."""
        if masks is None:
            return self.encoder(images).detach(), None
        tokens = self.encoder(images, masks["context"], masks["context_valid"])
        return tokens.detach(), self.predictor(
            tokens, masks["context"], masks["targets"], masks["context_valid"], masks["target_valid"]
        )


@dataclass
class StepOutcome:
    loss: float  # mean over the global batch
    grad_norm: float  # NaN when nothing was applied
    lr: float
    weight_decay: float
    pooled: torch.Tensor | None  # [B, D] mean of each sample's context tokens on this rank (health)
    corrupt: int  # samples of the global batch that failed to decode
    flops: float  # of the tokens the step processed, over all ranks (train/flops.py)
    context_tokens: float  # mean per sample of the global batch: what the student encoded
    target_tokens: float  # mean per sample, summed over its blocks: what the loss covered
    kept_fraction: float  # tokens trained on / tokens the mask generator drew
    stop: int | None  # a stop signal some rank received: every rank saves after this step

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float
    images_per_s: float
    seconds: float
    rank: int = 0  # of this process; rank 0 reports
    stop_signal: int | None = None  # the signal that ended the run early (after saving), if any


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of the valid tokens [B, K, D] of each sample -> [B, D] (padding left out)."""
    if valid is None:
        return tokens.mean(1)
    weight = valid.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weight).sum(1) / weight.sum(1)


def build_student(cfg: Config, out_dim: int, device: torch.device) -> Student:
    """Encoder and predictor; the attention backend is resolved for `device` here, so an
    explicit `model.attention=xformers` that cannot run fails before any training."""
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    encoder = build_encoder(cfg.model, cfg.data.image_size, device=device, dtype=dtype)
    predictor = build_predictor(
        cfg.predictor,
        cfg.model.embed_dim,
        out_dim,
        cfg.grid_size,
        attention=cfg.model.attention,
        init=cfg.model.init,
        device=device,
        dtype=dtype,
    )
    return Student(encoder, predictor)


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, tokens), the usual ViT recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def _say(world: World, message: str) -> None:
    if world.is_main:
        print(f"usjepa: {message}", file=_Stderr())


class _Stderr:
    """sys.stderr for the loop's own messages and progress bar: a terminal that hung up (SIGHUP
    after an ssh session closed) fails writes with EIO, which must not end a run that is about
    to save; what cannot be shown is dropped."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except OSError:
            pass

    def fileno(self) -> int:  # tqdm sizes its bar to the terminal
        return sys.stderr.fileno()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _leave_hung_up_terminal() -> None:
    """After SIGHUP, stdout and stderr that were the closed terminal go to /dev/null: a write to a
    hung-up terminal fails (EIO), which would end the run before it saves. Redirected ones stay."""
    devnull = None
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                devnull = os.open(os.devnull, os.O_WRONLY) if devnull is None else devnull
                os.dup2(devnull, fd)
        except OSError:
            pass
    if devnull is not None:
        os.close(devnull)


class StopSignal:
    """The STOP_SIGNALS ask the loop to finish its step, save and exit; one of KEPT_IF_IGNORED
    that the process was started ignoring (SIGHUP under `nohup`) stays ignored."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            if sig in KEPT_IF_IGNORED and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the host program
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if signum == getattr(signal, "SIGHUP", None):
            _leave_hung_up_terminal()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.world = World.join(cfg, resolve_device(cfg.run.device))
        self.device = self.world.device
        self.run_dir = Path(cfg.run.dir)
        # First the run dir's owner, so that a second run is refused at once; then what can
        # refuse a start, before anything is written; a refused start leaves the dir as it was.
        self.lock = hold_run_dir(self.run_dir, self.world)
        try:
            drift = run_drift(cfg)
            if has_checkpoints(self.run_dir):
                refuse_unresumable(cfg, drift)  # before damaged checkpoints are moved aside
            # Rank 0 moves damaged checkpoints aside first; then every rank finds the same one.
            latest = resume_checkpoint(self.run_dir, repair=True) if self.world.is_main else None
            barrier()
            if not self.world.is_main:
                latest = resume_checkpoint(self.run_dir, repair=False)
            self.shard_set = ShardSet.load(cfg)
            self.micro_batches = micro_batches_per_step(cfg, self.world.size)
            self._prepare(cfg, latest, drift)
        except BaseException:
            self.lock.release(undo=True)  # a refused start must not keep the run dir from the next one
            raise

    def _prepare(self, cfg: Config, latest: Path | None, drift: list[str]) -> None:
        """Models, optimizer and teacher, resumed from checkpoint `latest` if any."""
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.teacher: Encoder | None = None  # salt: the frozen teacher
        self.teacher_info: TeacherInfo | None = None
        self.ema_target: Encoder | None = None  # ema: the moving average of the student's encoder
        objective = cfg.train.objective
        if objective == "salt":
            self.teacher, self.teacher_info = load_teacher(cfg, self.device)
            out_dim = self.teacher_info.embed_dim
        else:
            out_dim = cfg.model.embed_dim if objective == "ema" else cfg.model.patch_size**2
        student = build_student(cfg, out_dim, self.device).to(self.device)
        self.parameters_m = sum(p.numel() for p in student.parameters()) / 1e6
        if objective == "ema":
            self.ema_target = prepare_target(make_target(student.encoder), cfg, self.world)
        self.student = prepare_student(student, cfg, self.world)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=cfg.optim.start_lr, betas=cfg.optim.betas)
        self.step = 0
        self.nonfinite_in_a_row = 0
        # Run totals, kept across resumes (flops: model FLOPs of every step so far, train/flops.py).
        self.counters = {"nonfinite_skipped": 0, "corrupt_skipped": 0, "flops": 0.0}
        torch.manual_seed(cfg.run.seed + self.world.rank)  # drop-path differs between ranks
        if latest is not None:
            self._resume(latest, drift)
        if self.world.is_main:  # the start or resume is accepted
            try:
                write_resolved_config(cfg)
            except OSError as e:
                raise self._cannot_write(f"the resolved config in {self.run_dir}", e) from None
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
        # MFU's denominator is this times the world size (None: a GPU of unknown peak).
        self.peak_tflops = peak_tflops(self.device, cfg.train.precision, cfg.log.peak_tflops)

    def _cannot_write(self, what: str, e: OSError) -> Exception:
        return cannot_write(what, e.strerror or str(e), ckpt.resume_point(self.run_dir))

    def _resume(self, path: Path, drift: list[str]) -> None:
        meta = ckpt.load_checkpoint(path, self.student, self.optimizer, self.ema_target)
        self._check_teacher(meta)
        self.step = meta["step"]
        self.counters.update(meta.get("counters", {}))
        states = meta["rng"]
        if len(states) == self.world.size:
            ckpt.set_rng_state(states[self.world.rank])
        else:  # another world size: the data is unchanged, only drop-path draws differ
            torch.manual_seed(self.cfg.run.seed + self.world.rank + 7919 * self.step)
        saved_world = meta.get("world_size", 1)
        resharded = (
            f"; resharded from {saved_world} to {self.world.size} ranks" if saved_world != self.world.size else ""
        )
        changed = f"; changed settings: {', '.join(drift)}" if drift else ""
        _say(self.world, f"resuming {self.run_dir} from step {self.step}{resharded}{changed}")

    def _check_teacher(self, meta: dict) -> None:
        saved = meta.get("teacher")
        now = self.teacher_info.as_dict() if self.teacher_info else None
        if saved and now and saved["sha256"] != now["sha256"]:
            raise UserError(
                f"{self.run_dir}: its checkpoints were trained against teacher {saved['source']} "
                f"(sha256 {saved['sha256'][:12]}), not {now['source']} ({now['sha256'][:12]}); "
                "restore teacher.checkpoint or start a new run.dir"
            )
        for key in ("mean", "std"):
            if saved and now and key in saved and list(saved[key]) != list(now[key]):
                raise UserError(
                    f"{self.run_dir}: its checkpoints were trained with teacher.{key}={list(saved[key])}, "
                    f"not {list(now[key])}; restore that setting or start a new run.dir"
                )

    def describe(self) -> str:
        """The effective batch and what runs where: printed at start, logged as text."""
        cfg, w = self.cfg, self.world
        share = cfg.data.batch_size // w.size
        micro = f" in {self.micro_batches} micro-batches" if self.micro_batches > 1 else ""
        lines = [
            f"global batch {cfg.data.batch_size} = {w.size} rank(s) x {share}{micro}; "
            f"{cfg.data.streams} data stream(s) x {cfg.data.batch_size // cfg.data.streams} samples; "
            f"peak lr {cfg.optim.lr:g}, {cfg.train.total_steps} steps",
            f"student {self.parameters_m:.2f} M parameters"
            f"{f' (FSDP2, sharded over {w.size} ranks)' if w.distributed else ''} on {self.device}, "
            f"{cfg.train.precision}, attention {self.student.encoder.blocks[0].attn.backend}",
        ]
        if self.peak_tflops:
            lines.append(
                f"perf/mfu against a peak of {self.peak_tflops:g} TFLOP/s per device "
                f"({cfg.train.precision}{', log.peak_tflops' if cfg.log.peak_tflops else ''})"
            )
        else:
            lines.append(
                f"no peak TFLOP/s known for {torch.cuda.get_device_name(self.device)}: set log.peak_tflops "
                "to log perf/mfu"
            )
        if cfg.train.validate:
            every = validation_batch_count(cfg, self.shard_set.manifests)
            used = validation_batch_count(cfg, self.shard_set.manifests, max_batches=cfg.val_batch_limit)
            lines.append(
                f"validation at each checkpoint (every {cfg.checkpoint.every_steps} steps): {used} of the "
                f"{every} batches of the val split" + ("" if used else " (no val split: nothing to validate)")
            )
        if self.teacher is not None:
            info = self.teacher_info
            lines.append(
                f"teacher {info.source}: {info.dtype}, replicated, "
                f"{1024 * module_gib(self.teacher):.1f} MiB per rank; input normalised with mean "
                f"{list(info.mean)}, std {list(info.std)}"
            )
            if not info.final_norm:
                lines.append(
                    "teacher has no final norm on its tokens: "
                    + (
                        "its targets are LayerNorm'd (teacher.layernorm_targets=true)"
                        if cfg.teacher.layernorm_targets
                        else "WARNING, teacher.layernorm_targets=false regresses raw, unnormalised latents"
                    )
                )
        if self.ema_target is not None:
            start, end = cfg.train.ema_momentum
            lines.append(
                f"EMA target of the student's encoder: momentum {start:g} -> {end:g}, "
                f"{'sharded like the student' if w.distributed else 'fp32'}, "
                f"{1024 * module_gib(self.ema_target):.3g} MiB per rank"
            )
        return "\n  ".join(lines)

    # -- one step -----------------------------------------------------------------------------
    @property
    def target_encoder(self) -> Encoder | None:
        """The encoder whose latents are the targets: the frozen teacher, the EMA target, or
        None (pixel targets)."""
        return self.teacher if self.teacher is not None else self.ema_target

    @torch.no_grad()
    def target_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder's latents of every patch of `images` [B, N, D], without gradient."""
        if self.teacher is not None:
            return self.teacher(images.to(next(self.teacher.parameters()).dtype))
        with self.autocast:
            latents = self.ema_target(images)
        reshard_target(self.ema_target)
        return latents

    def targets(self, batch: dict, latents: torch.Tensor | None = None) -> torch.Tensor:
        """What the predictor must output at the target positions of `batch` (on the device);
        `latents` of the target encoder when already computed."""
        cfg = self.cfg
        images, targets = batch["images"], batch["targets"]
        if self.target_encoder is None:
            return pixel_targets(images, cfg.model.patch_size, targets, cfg.train.norm_pix_targets)
        latents = self.target_latents(images) if latents is None else latents
        return latent_targets(latents, targets, cfg.teacher.layernorm_targets)

    def loss(self, batch: dict, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the samples of `batch`, and the student's context tokens."""
        with self.autocast:
            tokens, pred = self.student(batch["images"], batch)
        valid = batch["target_valid"]
        return regression_loss(
            pred, target, None if valid is None else valid.flatten(0, 1), batch["targets"].shape[0], self.cfg.train
        ), tokens

    def _on_device(self, batch: dict, sl: slice = slice(None)) -> dict:
        """Samples `sl` of a collated batch on the device, their masks cut to the longest of
        them (padding is work without signal). A valid-flag tensor without padding becomes None,
        decided here on the CPU, so the models run their unmasked kernels without a device sync."""
        kc = int(batch["context_valid"][sl].sum(1).max())
        kt = int(batch["target_valid"][:, sl].sum(2).max())
        part = {
            "images": batch["images"][sl],
            "context": batch["context"][sl, :kc],
            "context_valid": batch["context_valid"][sl, :kc],
            "targets": batch["targets"][:, sl, :kt],
            "target_valid": batch["target_valid"][:, sl, :kt],
        }
        return {
            k: None if k.endswith("_valid") and bool(v.all()) else v.to(self.device, non_blocking=True)
            for k, v in part.items()
        }

    def _placeholder(self) -> dict:
        """One blank sample with one-patch masks, for a pass without samples (weight 0)."""
        size, n_targets = self.cfg.data.image_size, self.cfg.mask.num_targets
        index = torch.zeros(n_targets, 1, 1, dtype=torch.long, device=self.device)
        return {
            "images": torch.zeros(1, 1, size, size, device=self.device),
            "context": index[0],
            "context_valid": None,
            "targets": index,
            "target_valid": None,
        }

    def _set_schedules(self) -> tuple[float, float]:
        o, total = self.cfg.optim, self.cfg.train.total_steps
        lr = warmup_cosine(self.step, total, o.warmup_steps, o.start_lr, o.lr, o.final_lr)
        wd = cosine(self.step / total, o.weight_decay, o.final_weight_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        return lr, wd

    def _update(self, loss: float) -> float:
        """Clip and step unless `loss` or the gradient is not finite; returns the pre-clip grad
        norm (NaN or infinite: nothing was applied)."""
        norm = math.nan
        if math.isfinite(loss):
            params = [p for p in self.student.parameters() if p.requires_grad]
            max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else math.inf
            norm = as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if math.isfinite(norm):
            self.optimizer.step()
            if self.ema_target is not None:
                start, end = self.cfg.train.ema_momentum
                ema_update(
                    self.ema_target,
                    self.student.encoder,
                    ema_momentum(self.step, self.cfg.train.total_steps, start, end),
                )
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _collate_global(self, batch: dict) -> tuple[dict, list[list[float]]]:
        """This rank's share collated, and every rank's [samples, corrupt, context drawn,
        target drawn]. Under `mask.truncate_to_shortest` masks are cut to the shortest of the
        whole global batch, so a sample's cut does not depend on the rank that holds it."""
        masks = batch["masks"]
        shortest = mask_lengths(masks) if masks else (sys.maxsize, sys.maxsize)
        drawn = [sum(len(m.context) for m in masks), sum(len(t) for m in masks for t in m.targets)]
        counts = self.world.gather([len(batch["ids"]), batch["corrupt"], *drawn, *shortest])
        if not sum(c[0] for c in counts):
            collate_batch(batch)  # raises the all-corrupt error (on every rank alike)
        truncate = (
            (int(min(c[4] for c in counts)), int(min(c[5] for c in counts)))
            if self.cfg.mask.truncate_to_shortest
            else None
        )
        return (collate_batch(batch, truncate) if batch["ids"] else batch), [c[:4] for c in counts]

    def _micro_batches(self, batch: dict) -> Iterator[tuple[dict, int]]:
        """(samples on the device, how many) per pass of this rank, gradients synchronised in the
        last. Every rank runs the same number of passes (FSDP gathers parameters in each one); a
        pass left without samples (corrupt ones skipped) runs a placeholder of size 0."""
        start = 0
        for i, size in enumerate(split_sizes(len(batch["ids"]), self.micro_batches)):
            set_gradient_sync(self.student, i == self.micro_batches - 1)
            yield (self._on_device(batch, slice(start, start + size)) if size else self._placeholder()), size
            start += size

    def _outcome(
        self,
        batch: dict,
        counts: list[list[float]],
        loss_sum: torch.Tensor,
        pooled: list[torch.Tensor],
        stop_requested: int | None,
        lr: float,
        wd: float,
    ) -> StepOutcome:
        """What every rank agrees on after the backward passes: the global mean loss, FLOPs and
        token counts over all ranks, and the first stop signal any rank received."""
        total = sum(c[0] for c in counts)
        mine = (
            [0.0, 0.0, 0.0]
            if not batch["ids"]
            else [
                batch_flops(self.student, self.target_encoder, batch["context_valid"], batch["target_valid"]),
                float(batch["context_valid"].sum()),
                float(batch["target_valid"].sum()),
            ]
        )
        shared = self.world.gather([loss_sum.item(), stop_requested or 0, *mine])
        received = {int(s[1]) for s in shared if s[1]}
        trained_context, trained_target = sum(s[3] for s in shared), sum(s[4] for s in shared)
        return StepOutcome(
            loss=sum(s[0] for s in shared) / total,
            grad_norm=math.nan,
            lr=lr,
            weight_decay=wd,
            pooled=torch.cat(pooled) if pooled else None,
            corrupt=int(sum(c[1] for c in counts)),
            flops=sum(s[2] for s in shared),
            context_tokens=trained_context / total,
            target_tokens=trained_target / total,
            kept_fraction=(trained_context + trained_target) / sum(c[2] + c[3] for c in counts),
            stop=next((s for s in StopSignal.SIGNALS if s in received), None),
        )

    def train_step(self, batch: dict, meter: Meter | None = None, stop_requested: int | None = None) -> StepOutcome:
        """One optimizer step on the global batch, of which `batch` is this rank's share (masks
        per sample): per micro-batch the targets, the student's prediction of them and the
        loss's backward, then the update (skipped when the loss or gradient is not finite).
        `stop_requested` (a signal this rank got) is shared with all ranks."""
        meter = meter or Meter(self.device)
        lr, wd = self._set_schedules()
        batch, counts = self._collate_global(batch)
        total = sum(c[0] for c in counts)  # samples of the global batch: the loss weights
        loss_sum, pooled = torch.zeros((), device=self.device), []
        for part, size in self._micro_batches(batch):
            with meter.phase("teacher"):
                target = self.targets(part)  # teacher or EMA latents, or pixels, of the target blocks
            with meter.phase("student"):
                loss, tokens = self.loss(part, target)  # encoder on the context, predictor on the blocks
                # FSDP averages gradients over ranks, hence the world size in the weight.
                (loss * (size * self.world.size / total)).backward()
            if size:
                loss_sum += loss.detach() * size
                pooled.append(masked_mean(tokens, part["context_valid"]))
        outcome = self._outcome(batch, counts, loss_sum, pooled, stop_requested, lr, wd)
        with meter.phase("optimizer"):
            outcome.grad_norm = self._update(outcome.loss)
        self.step += 1
        return outcome

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """On the validation split: the mean loss (`loss`), and RankMe and feature std of the
        mean-pooled features a probe would see, of the student's encoder and of the target
        encoder (`student_rankme`, `target_feature_std`, ...); None when there is no split to
        measure. Ranks take turns with the batches; every rank runs the same number of passes
        (FSDP gathers parameters in each), padding with weight-0 placeholders."""
        cfg, world = self.cfg, self.world
        manifests, limit = self.shard_set.manifests, cfg.val_batch_limit
        n_batches = validation_batch_count(cfg, manifests, max_batches=limit)
        if not cfg.train.validate or not n_batches:
            return None
        passes = micro_batches_per_step(cfg, world_size=1)  # a validation batch is a whole global batch
        mine = validation_batches(cfg, manifests, max_batches=limit, rank=world.rank, world_size=world.size)
        self.student.eval()
        total = count = 0.0
        pooled: dict[str, list[torch.Tensor]] = {"student": [], "target": []}
        for _ in range(math.ceil(n_batches / world.size)):
            batch = next(mine, (None, None))[1]  # None: this rank has no batch left in this round
            sizes = split_sizes(batch["images"].shape[0], passes) if batch else [0] * passes
            start = 0
            for size in sizes:  # the memory limit of training holds here too
                part = self._on_device(batch, slice(start, start + size)) if size else self._placeholder()
                start += size
                latents = self.target_latents(part["images"]) if self.target_encoder is not None else None
                loss, _ = self.loss(part, self.targets(part, latents))
                with self.autocast:
                    features, _ = self.student(part["images"])
                total += loss.item() * size
                count += size
                if size:
                    pooled["student"].append(features.float().mean(1).cpu())
                    if latents is not None:
                        pooled["target"].append(latents.float().mean(1).cpu())
        self.student.train()
        total, count = (sum(x) for x in zip(*world.gather([total, count])))
        metrics = {"loss": total / count}
        for name, parts in pooled.items():
            every_rank = [t for rank_parts in world.gather_objects(parts) for t in rank_parts]
            if every_rank:
                features = torch.cat(every_rank)
                metrics[f"{name}_rankme"] = rankme(features)
                metrics[f"{name}_feature_std"] = feature_std(features)
        return metrics

    def save(self, val_loss: float | None) -> Path:
        meta = {
            "samples_seen": self.step * self.cfg.data.batch_size,
            "data_position": self.step,
            "val_loss": val_loss,
            "counters": dict(self.counters),
            "world_size": self.world.size,
            "rng": self.world.gather_objects(ckpt.rng_state()),
            "teacher": self.teacher_info.as_dict() if self.teacher_info else None,
            "time": time.time(),
        }
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.student,
            self.optimizer,
            meta,
            self.cfg.checkpoint.keep_last,
            target=self.ema_target,
        )

    # -- the loop -----------------------------------------------------------------------------
    def _count_nonfinite(self, outcome: StepOutcome, writer: EventWriter | None) -> None:
        if outcome.finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.counters["nonfinite_skipped"] += 1
        if writer:
            writer.add_scalar("train/nonfinite_skipped", self.counters["nonfinite_skipped"], self.step)
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
            raise UserError(
                f"step {self.step}: loss or gradient not finite for {self.nonfinite_in_a_row} steps "
                f"in a row (loss={outcome.loss}, grad norm={outcome.grad_norm}); the last checkpoint "
                "is intact: lower optim.lr or check the data, then rerun"
            )

    def _log(self, writer: EventWriter, outcome: StepOutcome, meter: Meter) -> None:
        perf = meter.read_and_reset()
        if self.peak_tflops:
            perf["mfu"] = perf["tflop_per_s"] / (self.peak_tflops * self.world.size)
        scalars = {
            "train/loss": outcome.loss,
            "train/lr": outcome.lr,
            "train/weight_decay": outcome.weight_decay,
            "train/grad_norm": outcome.grad_norm,
            "train/global_batch": self.cfg.data.batch_size,
            **{f"perf/{k}": v for k, v in perf.items()},
            "perf/tflops": outcome.flops / 1e12,
            "perf/total_pflops": self.counters["flops"] / 1e15,
            "perf/peak_memory_gib": peak_memory_gib(self.device),
            "data/corrupt_skipped": self.counters["corrupt_skipped"],
            "mask/context_tokens": outcome.context_tokens,
            "mask/target_tokens": outcome.target_tokens,
            "mask/kept_fraction": outcome.kept_fraction,
        }
        if outcome.pooled is not None:  # None: every sample of this rank's share was corrupt
            scalars["health/feature_std"] = feature_std(outcome.pooled)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, self.step)

    def _checkpoint(self, writer: EventWriter | None, validate: bool = True) -> None:
        metrics = self.validate() if validate else None
        if metrics is not None and writer:
            for name, value in metrics.items():
                writer.add_scalar(f"val/{name}", value, self.step)
        self.save(metrics["loss"] if metrics else None)

    def run(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        end = min(cfg.run.stop_at_step or cfg.train.total_steps, cfg.train.total_steps)
        if self.step >= end:
            _say(world, f"{self.run_dir} is already at step {self.step}; nothing to do")
            return TrainResult(self.run_dir, self.step, math.nan, 0.0, 0.0, world.rank)
        setup = self.describe()
        _say(world, setup)
        if world.is_main:
            try:
                record_start(self.run_dir, self.step, world.size, world.launcher)
            except OSError as e:
                raise self._cannot_write(f"the launch record in {self.run_dir}", e) from None
        bar = tqdm(
            file=_Stderr(),
            total=end,
            initial=self.step,
            disable=not (cfg.log.progress and world.is_main),
            desc=cfg.train.objective,
            unit="step",
            dynamic_ncols=True,
        )
        writer = self._open_writer(setup)
        self.student.train()
        first_step, meter = self.step, Meter(self.device)
        try:
            outcome = self._train_until(end, meter, writer, bar)
        finally:
            bar.close()
            if writer:
                writer.close()  # every event is written already: closing cannot fail
        seconds = meter.total_seconds()
        images = (self.step - first_step) * cfg.data.batch_size
        # The last step's stop signal is the one that ended the run (None: it ran to `end`).
        return TrainResult(self.run_dir, self.step, outcome.loss, images / seconds, seconds, world.rank, outcome.stop)

    def _open_writer(self, setup: str) -> EventWriter | None:
        """Rank 0's TensorBoard writer, the events after the resumed step dropped (they are
        logged again); the setup as text on a fresh run."""
        if not self.world.is_main:
            return None
        resume_point = ckpt.resume_point(self.run_dir)
        if self.step:
            drop_steps_after(self.run_dir / "tb", self.step, resume_point)
        writer = EventWriter(
            self.run_dir / "tb",
            purge_step=self.step + 1 if self.step else None,
            resume_point=lambda: ckpt.resume_point(self.run_dir),
        )
        if not self.step:
            writer.add_text("run/setup", setup.replace("\n", "  \n"), 0)
        return writer

    def _train_until(self, end: int, meter: Meter, writer: EventWriter | None, bar: tqdm) -> StepOutcome:
        """Steps up to `end`, checkpointed every checkpoint.every_steps and at the end; a stop
        signal ends the run after the step, saved. Returns the last step's outcome."""
        cfg, world = self.cfg, self.world
        with StopSignal() as stop, contextlib.ExitStack() as stack:
            # Loader workers start inside: none may run a launcher's handler (submitit's requeues).
            batches = stack.enter_context(make_train_loader(cfg, self.shard_set, self.step, world.rank, world.size))
            while self.step < end:
                logged = (self.step + 1) % cfg.log.every_steps == 0 or self.step + 1 == end
                meter.begin_step(timed=logged)
                with meter.phase("data"):
                    batch = next(batches)
                outcome = self.train_step(batch, meter, stop_requested=stop.received)
                self._add_to_totals(outcome, meter)
                self._count_nonfinite(outcome, writer)
                if writer and logged:
                    self._log(writer, outcome, meter)
                if world.is_main and logged:
                    bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{outcome.lr:.2e}")
                if writer:
                    self._log_masks(writer, batch)
                bar.update(1)
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == end or outcome.stop:
                    # A stop must save within the launcher's grace time: no validation then.
                    self._checkpoint(writer, validate=not outcome.stop)
                if outcome.stop:
                    _say(world, f"{signal.Signals(outcome.stop).name} received; saved step {self.step} and stopped")
                    break
        return outcome

    def _add_to_totals(self, outcome: StepOutcome, meter: Meter) -> None:
        """The step's share of the run totals and of the meter's throughput."""
        batch_size = self.cfg.data.batch_size
        self.counters["corrupt_skipped"] += outcome.corrupt
        self.counters["flops"] += outcome.flops
        meter.count(
            batch_size,
            outcome.flops,
            (outcome.context_tokens + outcome.target_tokens) * (batch_size - outcome.corrupt),
        )

    def _log_masks(self, writer: EventWriter, batch: dict) -> None:
        """Mask overlays of this rank's share after the first step and every log.image_every_steps."""
        every = self.cfg.log.image_every_steps
        if not (batch["ids"] and every and (self.step == 1 or self.step % every == 0)):
            return
        shown = collate_batch(batch)
        writer.add_image(
            "masks/context_green_targets_red",
            mask_overlay(shown["images"], shown["context"], shown["targets"], self.cfg.model.patch_size),
            self.step,
        )


def train(cfg: Config) -> TrainResult:
    """Train (or resume) the run of `cfg`; in a distributed launch every rank calls this."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.lock.release()
        if trainer.world.distributed:
            shutdown_distributed()
