"""The pretraining loop: AdamW, warmup + cosine schedule, gradient clipping, bf16 autocast.

bf16 autocast runs on CUDA, and on the CPU with ``--cpu-bf16``.

Determinism: the data order of epoch ``e`` comes from a sampler seeded with ``(seed, e)`` and the masks of
step ``s`` from a generator seeded with ``(seed, e, s, rank)``; neither depends on what ran before, so a run
stopped after epoch 1 and resumed to epoch 3 ends with the same weights as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from bidsapp.distributed import DistributedContext
from bidsapp.errors import BadDataError, TrainingDivergedError
from bidsapp.io import atomic_path
from bidsapp.logs import get_logger
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import MaskingStrategy
from bidsapp.runtime import step_generator
from bidsapp.windows import collate_windows

log = get_logger("training")

#: Offset of the validation mask seed, so validation masks never coincide with training ones.
VALIDATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to ``peak_lr`` then cosine decay to ``peak_lr * final_fraction`` (per step)."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    final_fraction: float = 0.01

    def lr(self, step: int) -> float:
        """The learning rate at ``step``."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.peak_lr * self.final_fraction
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class EpochMetrics:
    """What one epoch reports (one row of the training log)."""

    epoch: int
    train_loss: float
    val_loss: float
    masked_brain_fraction: float
    lr: float
    seconds: float

    def as_row(self) -> dict[str, float | int]:
        """The metrics as a row of the training log."""
        return dict(self.__dict__)


class TrainingHistory:
    """The training log: one row of :class:`EpochMetrics` per epoch, as ``training_log.tsv``.

    Parameters
    ----------
    frame : pandas.DataFrame, optional
        Rows already trained (read back with :meth:`read` on ``--resume``); empty by default.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per epoch, columns :data:`COLUMNS` in order.
    """

    #: The columns of the log, in the order written.
    COLUMNS: tuple[str, ...] = tuple(EpochMetrics.__dataclass_fields__)

    def __init__(self, frame: pd.DataFrame | None = None) -> None:
        self.frame = pd.DataFrame(columns=list(self.COLUMNS)) if frame is None else frame

    def __len__(self) -> int:
        return len(self.frame)

    def add(self, metrics: EpochMetrics) -> None:
        """Append the row of ``metrics``, replacing those of its epoch and later ones."""
        # An epoch trained again replaces its row (and any later ones): the log never lists an
        # epoch twice, nor an epoch newer than the weights.
        self.frame = pd.concat([self.frame[self.frame["epoch"] < metrics.epoch],
                                pd.DataFrame([metrics.as_row()])], ignore_index=True)

    def until(self, epoch: int) -> TrainingHistory:
        """The rows of epochs ``1 .. epoch``."""
        return TrainingHistory(self.frame[self.frame["epoch"] <= epoch].reset_index(drop=True))

    def last(self) -> dict[str, Any]:
        """The row of the last epoch (empty when no epoch is logged)."""
        return self.frame.iloc[-1].to_dict() if len(self.frame) else {}

    def write(self, path: Path) -> None:
        """Write the log as TSV, atomically, with ``n/a`` for missing values (BIDS)."""
        with atomic_path(path) as tmp:
            self.frame.to_csv(tmp, sep="\t", index=False, na_rep="n/a")

    @classmethod
    def read(cls, path: Path) -> TrainingHistory:
        """The log of the run being resumed (empty when there is none yet).

        Raises
        ------
        BadDataError
            The log is empty, unreadable or without the columns this version writes (exit 65).
        """
        if not path.is_file():
            return cls()
        try:
            frame = pd.read_csv(path, sep="\t", na_values="n/a")
        except (OSError, UnicodeDecodeError, pd.errors.ParserError,
                pd.errors.EmptyDataError) as exc:
            raise BadDataError(f"--resume: the training log {path} is damaged "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                               "restore it or start a new OUTPUT_DIR") from exc
        missing = [c for c in cls.COLUMNS if c not in frame.columns]
        if missing or not pd.api.types.is_numeric_dtype(frame["epoch"]):
            raise BadDataError(f"--resume: the training log {path} is damaged (columns "
                               f"{', '.join(missing) or 'epoch'} missing or not numbers); restore "
                               "it or start a new OUTPUT_DIR")
        return cls(frame)


def training_network(model: MaskedAutoencoder, ctx: DistributedContext, *,
                     compile_model: bool = False) -> torch.nn.Module:
    """The module a training step calls: ``model`` itself, in DDP across ranks, compiled if asked.

    Parameters
    ----------
    model : MaskedAutoencoder
        The autoencoder, already on ``ctx.device``.
    ctx : DistributedContext
        With more than one process, the model is wrapped in
        :class:`~torch.nn.parallel.DistributedDataParallel`.
    compile_model : bool
        Compile the forward pass with :func:`torch.compile`.

    Returns
    -------
    torch.nn.Module
        Called as ``network(x, brain, mask)``; its weights are those of ``model``.
    """
    network: torch.nn.Module = model
    if ctx.enabled:
        cuda = ctx.device.type == "cuda"
        network = DistributedDataParallel(model, device_ids=[ctx.device] if cuda else None)
    if compile_model:
        # Background skipping selects tokens by content (data-dependent shapes, graph breaks);
        # the plain path computes the same outputs with static shapes, which compile well.
        model.skip_background = False
        # Only the forward is compiled; weights and checkpoints stay those of ``model``.
        network = torch.compile(network)
    return network


@dataclass(frozen=True)
class TrainingSettings:
    """How :class:`Trainer` trains: the pretrain level's options, gathered once from the config.

    Attributes
    ----------
    seed : int
        Seeds the data order and the masks (``--random-seed``).
    epochs : int
        The last epoch to train.
    batch_size : int
        Windows per step and process.
    lr : float
        Peak learning rate of the warmup + cosine schedule.
    weight_decay : float
        AdamW weight decay (not applied to biases, norms and positional embeddings).
    warmup_epochs : float
        Length of the linear warmup, in epochs (a fraction is allowed).
    clip_grad : float
        Maximum gradient norm.
    num_workers : int
        Data-loader worker processes (0: load in the training process).
    compile_model : bool
        Compile the forward pass with :func:`torch.compile`.
    cpu_bf16 : bool
        On the CPU, run the forward pass in bfloat16 autocast, as on CUDA (where it always is).
    """

    seed: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    clip_grad: float
    num_workers: int = 0
    compile_model: bool = False
    cpu_bf16: bool = False


class Trainer:
    """Fit a :class:`MaskedAutoencoder` with one masking strategy, on one or many processes."""

    def __init__(self, model: MaskedAutoencoder, masking: MaskingStrategy, train_set: Dataset,
                 val_set: Dataset | None, *, ctx: DistributedContext,
                 settings: TrainingSettings) -> None:
        seed, epochs, batch_size = settings.seed, settings.epochs, settings.batch_size
        lr, num_workers = settings.lr, settings.num_workers
        self.settings = settings
        self.ctx = ctx
        self.model = model.to(ctx.device)
        self.masking = masking
        self.seed = seed
        self.epochs = epochs
        self.clip_grad = settings.clip_grad
        self.sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                          shuffle=True, seed=seed, drop_last=False)
        pin = ctx.device.type == "cuda"
        self.train_loader = DataLoader(train_set, batch_size=batch_size, sampler=self.sampler,
                                       collate_fn=collate_windows,
                                       num_workers=num_workers, pin_memory=pin,
                                       persistent_workers=num_workers > 0)
        self.val_loader = None
        if val_set is not None and len(val_set) > 0:
            val_sampler = DistributedSampler(val_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                             shuffle=False, drop_last=False)
            self.val_loader = DataLoader(val_set, batch_size=batch_size, sampler=val_sampler,
                                         collate_fn=collate_windows,
                                         num_workers=num_workers, pin_memory=pin)
        self.network = training_network(self.model, ctx, compile_model=settings.compile_model)
        decay, no_decay = _parameter_groups(self.model)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        steps_per_epoch = len(self.train_loader)
        self.schedule = Schedule(lr, max(1, round(settings.warmup_epochs * steps_per_epoch)),
                                 epochs * steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.autocast = ctx.device.type == "cuda" or settings.cpu_bf16

    def _batches(self, loader: Iterable, desc: str) -> Iterable:
        return tqdm(loader, desc=desc, leave=False, disable=None if self.ctx.is_main else True,
                    unit="batch")

    def _forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["x"].to(self.ctx.device, non_blocking=True)          # (B, T, D, H, W) working grid
        brain = batch["brain"].to(self.ctx.device, non_blocking=True)  # (B, D, H, W)
        mask = self.masking(x.shape[0], x.shape[1], generator)
        with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.network(x, brain, mask)
        _, brain_work = self.model.prepare(x[:, :1], brain)
        return out.loss.float(), mask.brain_fraction(brain_work).mean()

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """One pass over the training set; returns (mean loss, mean masked fraction, last lr)."""
        self.network.train()
        self.sampler.set_epoch(epoch)
        totals = torch.zeros(3, dtype=torch.float64)
        lr = 0.0
        for step, batch in enumerate(self._batches(self.train_loader, f"epoch {epoch}")):
            global_step = (epoch - 1) * self.steps_per_epoch + step
            lr = self.schedule.lr(global_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            generator = step_generator(self.seed, epoch, step, self.ctx.rank,
                                       device=self.ctx.device)
            loss, fraction = self._forward(batch, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            # Before the step: the weights never take a non-finite update.
            self._stop_if_diverged(torch.isfinite(loss) & torch.isfinite(norm),
                                   f"epoch {epoch}, step {step + 1}", loss=loss,
                                   gradient_norm=norm)
            self.optimizer.step()
            totals += torch.tensor([loss.item(), fraction.item(), 1.0], dtype=torch.float64)
        totals = self.ctx.all_sum(totals)
        return totals[0].item() / totals[2].item(), totals[1].item() / totals[2].item(), lr

    def _stop_if_diverged(self, finite: torch.Tensor | bool, where: str,
                          **values: torch.Tensor | float) -> None:
        """Raise :class:`TrainingDivergedError` on every rank if any rank saw a non-finite value.

        The decision is summed over ranks so that all stop together (one rank raising alone
        would leave the others waiting in the next collective). ``values`` (tensors or numbers)
        are read and named in the message only then.
        """
        bad = torch.tensor([0.0 if bool(finite) else 1.0], dtype=torch.float64,
                           device=self.ctx.device)
        if self.ctx.all_sum(bad).item() > 0:
            shown = ", ".join(
                f"{name.replace('_', ' ')} "
                f"{float(value.detach() if isinstance(value, torch.Tensor) else value):.4g}"
                for name, value in values.items())
            raise TrainingDivergedError(f"training diverged at {where}: {shown} (non-finite)")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out masked reconstruction loss, with the same masks at every epoch."""
        if self.val_loader is None:
            return float("nan")
        self.network.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for step, batch in enumerate(self.val_loader):
            generator = step_generator(self.seed + VALIDATION_SEED_OFFSET, step, self.ctx.rank,
                                       device=self.ctx.device)
            loss, _ = self._forward(batch, generator)
            n = batch["x"].shape[0]
            totals += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        totals = self.ctx.all_sum(totals)
        return totals[0].item() / max(totals[1].item(), 1.0)

    def fit(self, start_epoch: int, on_epoch_end: Callable[[EpochMetrics], None]) -> None:
        """Train epochs ``start_epoch .. epochs``; call ``on_epoch_end`` after each one."""
        for epoch in range(start_epoch, self.epochs + 1):
            t0 = time.perf_counter()
            train_loss, fraction, lr = self.train_epoch(epoch)
            val_loss = self.evaluate()
            metrics = EpochMetrics(epoch, train_loss, val_loss, fraction, lr,
                                   time.perf_counter() - t0)
            # Finite steps can still end on overflowing weights: checked before they are saved.
            weights = [bool(torch.isfinite(p).all()) for p in self.model.parameters()]
            self._stop_if_diverged(
                all(weights) and math.isfinite(train_loss)
                and (self.val_loader is None or math.isfinite(val_loss)),
                f"the end of epoch {epoch}", train_loss=train_loss, held_out_loss=val_loss,
                non_finite_weight_tensors=weights.count(False))
            if self.ctx.is_main:
                log.info("epoch %d/%d: train loss %.4f, held-out loss %.4f, %.0f%% of brain "
                         "masked, %.1f s", epoch, self.epochs, train_loss, val_loss,
                         100 * fraction, metrics.seconds)
            on_epoch_end(metrics)
            self.ctx.barrier()


def _parameter_groups(model: torch.nn.Module) -> tuple[list, list]:
    # As in MAE: no weight decay on biases, norms, positional embeddings and the mask token.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or "pos" in name or "mask_token" in name or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay
