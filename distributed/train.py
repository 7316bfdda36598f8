"""train_loop: the one training loop. It imports no Ray: its caller hands it a Run that says its rank, device and
where reports go. Ray Train runs it on every DDP worker (run.py), a one-worker Tune trial runs it in the trial
process (tune.py), and tests, benchmarks and machines without Ray run it in one process (LocalRun).

It reads top to bottom: data, model, optimizer, schedule; then for each epoch train, evaluate, checkpoint,
report. What a checkpoint and a model file hold, and how they are written and read: modelfile.py.
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distributed import storage
from distributed.augment import mix_transform
from distributed.config import HISTORY_FILE, TrainConfig, better
from distributed.data import Decoded, load_data
from distributed.errors import ConfigError
from distributed.evaluate import confusion, input_size, metrics, predict, prepare_batch
from distributed.modelfile import (
    BEST_FILE,
    STATE_FILE,
    fold_states,
    load_model_state,
    load_state,
    model_blob,
    model_state,
    save_state,
    training_state,
)
from distributed.models import create_model, stages
from distributed.splits import Splits, class_weights, make_splits, validation_trains

MIN_BATCH = 2  # BatchNorm cannot train on a batch of one: epoch_batches skips it, steps_per_epoch does not count it
# ImageNet statistics; grey input uses their mean, which matches backbones whose first conv sums RGB filters.


# ---------------------------------------------------------------------------------------------- the loop

def train_loop(cfg: TrainConfig, data: Decoded | None, run: "Run") -> None:
    """The loop. `data`: the decoded images (None: decode here); `run`: where this copy runs and where it reports
    (a Ray Train worker, a Tune trial, or a LocalRun in one plain process).

    With cv_folds = k, k models (one per fold) train side by side: every epoch each trains once on its fold and
    the report is the mean of their validation metrics. So ASHA and early stopping judge the cross-validated score
    at every rung, which training the folds one after another could not offer (their epochs would not line up).
    The model kept (best_model.pt) is fold 1's at the best mean epoch; retrain a chosen config without cv_folds
    for a model that has seen all of train.

    With cfg.refit the validation split trains too (a chosen config's final model): it is still scored each epoch,
    in-sample, and the model kept is the last epoch's. cfg.keep_last keeps the last epoch's too, its validation
    held out (a final stage, whose length the search decided)."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank; DDP also broadcasts rank 0's
    # Every training batch has one shape, so cuDNN's per-shape algorithm search pays off from the second step on.
    torch.backends.cudnn.benchmark = run.device.type == "cuda"

    decoded = data or load_data(cfg)
    folds = [make_splits(decoded, cfg, fold) for fold in range(max(1, cfg.cv_folds))]
    class_names = folds[0].class_names
    images = shared_tensor(folds[0].x)  # every batch is gathered from here by index: the images are never copied
    labels = torch.from_numpy(folds[0].y)
    members = [build_member(cfg, s, run) for s in folds]
    in_sample = validation_trains(cfg)
    mix = mix_transform(cfg.mixup_alpha, cfg.cutmix_alpha, len(class_names))
    teacher = load_teacher(cfg, class_names, run.device) if cfg.teacher else []
    steps = [steps_per_epoch(len(m.train_idx), run.world, cfg.batch_size) for m in members]

    start_epoch, best, bad_epochs, history, best_blob = 1, None, 0, [], None
    resumed = run.resume()
    if resumed:  # a restarted worker group (or trial) resumes from its last epoch
        state, best_blob = resumed
        for m, saved in zip(members, fold_states(state)):
            load_model_state(saved, m.net, m.optimizer, m.ema)
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
    # Built after any resume and fast-forwarded, so a run resumed with more epochs stretches its schedule.
    for m, n in zip(members, steps):
        m.scheduler = make_schedule(cfg, m.optimizer, m.peak_lrs, total_steps=max(cfg.epochs, start_epoch) * n,
                                    epoch_steps=n,
                                    done_steps=(start_epoch - 1) * n)

    run_start = start_epoch  # > 1 when this process resumed from a checkpoint
    gen = torch.Generator(device=run.device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        tic = time.perf_counter()
        train_loss, seen = 0.0, 0
        for fold, m in enumerate(members):
            gen.manual_seed(epoch_seed(cfg, epoch, run.rank, fold))
            loss, n = train_epoch(m, cfg, epoch, images, labels, mix, gen, run, teacher)
            train_loss, seen = train_loss + loss, seen + n
        # Keep every rank stepping through the epoch (each must join each all-reduce); NaN spreads through DDP's
        # gradients anyway, so the epoch's summed loss tells whether any step diverged.
        finite = math.isfinite(train_loss)
        train_time = time.perf_counter() - tic
        if run.sum(0.0 if finite else 1.0) > 0:
            # Diverged (NaN/inf loss): report NaN metrics and end the run. Optuna records a NaN objective as a
            # failed trial, the search goes on, and the leaderboard shows it; no retry would help.
            nan = float("nan")
            run.report({"epoch": epoch, "diverged": True, "val_loss": nan, "val_acc": nan, "val_macro_f1": nan,
                        "train_loss": nan}, None)
            return

        for m in members:
            run.sync_buffers(m.scored)  # every rank scores with rank 0's BatchNorm statistics: the model that is saved
        validated = [validate(m.scored, m.val_x, m.val_y, cfg, run, len(class_names)) for m in members]
        scores = [sc for sc, _ in validated]
        metrics = {k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]}  # cross-validated: the fold mean
        metrics["val_count"] = sum(sc["val_count"] for sc in scores)
        metrics.update(epoch=epoch, train_loss=run.mean(train_loss, seen),
                       lr=members[0].optimizer.param_groups[0]["lr"],  # the head's scheduled rate now (lr_head: its peak)
                       images_per_s=run.sum(seen) / max(train_time, 1e-9), epoch_s=time.perf_counter() - tic,
                       trainable_stages=members[0].trainable, num_params=sum(p.numel() for p in members[0].net.parameters()),
                       run_start_epoch=run_start, node=run.node, torch_threads=torch.get_num_threads())
        value = metrics[cfg.monitor]
        # refit (the validation images train too) and keep_last: every epoch is the newest model, no early stop
        improved = best is None or in_sample or cfg.keep_last or better(cfg.monitor, value, best["value"])
        if improved:
            best, bad_epochs = {"value": value, "epoch": epoch}, 0
        else:
            bad_epochs += 1
        metrics["best_" + cfg.monitor] = best["value"]
        history.append(dict(metrics))  # every checkpoint carries it (history.json): what a lost result.json held
        stop = cfg.early_stop_patience > 0 and bad_epochs >= cfg.early_stop_patience
        metrics.update(early_stopped=stop, diverged=False)

        if improved and run.rank == 0:  # only the newest checkpoint is kept, so each carries the best weights
            best_blob = model_blob(members[0].scored, cfg, class_names, metrics, val_confusion=validated[0][1])
        with tempfile.TemporaryDirectory() as tmp:
            if run.rank == 0:
                states = [model_state(m.net, m.optimizer, m.ema) for m in members]
                save_state(tmp, training_state(epoch, states, best, bad_epochs, history), best_blob)
            run.report({**metrics, "train_config": cfg.to_dict()}, tmp)  # the resolved config, with every result
        if stop:
            break


@dataclass
class Member:
    """One model in training and everything that steps with it: the only one, or one fold's under cv_folds."""
    net: nn.Module
    stages: list[nn.Module]
    optimizer: torch.optim.Optimizer
    peak_lrs: list[float]
    ema: AveragedModel | None
    loss_fn: nn.Module
    train_idx: torch.Tensor  # into the shared images
    train_y: np.ndarray
    val_x: torch.Tensor
    val_y: torch.Tensor
    scheduler: object = None
    model: nn.Module | None = None  # net, or its DDP wrapper (rebuilt when the trainable stages change)
    trainable: int | None = None

    @property
    def scored(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net


def build_member(cfg: TrainConfig, splits: Splits, run: "Run") -> Member:
    """Model, optimizer (per-stage learning rates), EMA and loss for one split."""
    num_classes = len(splits.class_names)
    net = create_model(cfg.model, num_classes, in_channels=cfg.in_channels, dropout=cfg.dropout,
                       pretrained=cfg.pretrained, weights_path=cfg.weights_path).to(run.device)
    if cfg.channels_last and run.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    groups = stages(net)
    # Head first, so the first learning rate is lr_head and every backbone stage gets cfg.backbone_lr().
    peak_lrs = [cfg.lr_head] + [cfg.backbone_lr()] * (len(groups) - 1)
    optimizer = torch.optim.AdamW([{"params": list(g.parameters()), "lr": lr} for g, lr in zip(groups, peak_lrs)],
                                  weight_decay=cfg.weight_decay)
    ema = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay > 0 else None)
    weight = torch.tensor(class_weights(splits.train_y, num_classes), dtype=torch.float32, device=run.device)
    loss_fn = nn.CrossEntropyLoss(weight=weight if cfg.class_balance == "loss" else None,
                                  label_smoothing=cfg.label_smoothing)
    return Member(net, groups, optimizer, peak_lrs, ema, loss_fn, torch.from_numpy(splits.train_idx),
                  splits.train_y, torch.from_numpy(splits.val_x), torch.from_numpy(splits.val_y))


def train_epoch(m: Member, cfg: TrainConfig, epoch: int, images: torch.Tensor, labels: torch.Tensor,
                mix, gen: torch.Generator, run: "Run", teacher: list[nn.Module] = ()) -> tuple[float, int]:
    """One epoch of one member -> (summed training loss, images seen). With a teacher (load_teacher), the loss
    mixes the labels' cross-entropy with the KL divergence from the teacher's mean probabilities on the very batch
    the network sees (augmented and mixed: the teacher answers for the image as trained, not for its label)."""
    now_trainable = set_trainable(m.stages, cfg, epoch)
    if now_trainable != m.trainable:
        # DDP only all-reduces parameters that required grad when it was built: rebuild it on every change.
        m.trainable = now_trainable
        m.model = run.wrap(m.net)
    m.net.train()
    for i, g in enumerate(m.stages):
        if i >= m.trainable:
            g.eval()  # frozen stages keep their BatchNorm statistics
    train_loss, seen = torch.zeros((), device=run.device), 0
    for idx in epoch_batches(m.train_y, cfg, run.rank, run.world, epoch):
        idx = m.train_idx[idx]
        x = prepare_batch(images[idx], cfg, run.device, augment_with=gen if cfg.augment else None)
        y = labels[idx].to(run.device, non_blocking=True)
        if mix is not None:
            x, y = mix(x, y)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp and run.device.type == "cuda"):
            out = m.model(x)
            loss = m.loss_fn(out, y)
            if teacher:
                with torch.no_grad():
                    target = torch.stack([t(x).float().softmax(1) for t in teacher]).mean(0)
                matched = F.kl_div(F.log_softmax(out.float(), 1), target, reduction="batchmean")
                loss = (1 - cfg.teacher_weight) * loss + cfg.teacher_weight * matched
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(m.net.parameters(), cfg.grad_clip)
        m.optimizer.step()
        m.scheduler.step()
        if m.ema is not None:
            m.ema.update_parameters(m.net)
        # Summed on the device: a loss.item() per step would wait for the GPU every step.
        train_loss += loss.detach().float() * len(idx)
        seen += len(idx)
    return float(train_loss), seen  # one sync per epoch


def load_teacher(cfg: TrainConfig, class_names: list[str], device: str | torch.device) -> list[nn.Module]:
    """cfg.teacher's networks (an ensemble file's members, or one model file), in eval mode on the device. They
    are fed the network's own prepared batches, so they must answer the same classes from the same input."""
    from distributed.ensemble import load_predictor

    with tempfile.TemporaryDirectory() as tmp:
        path = cfg.teacher
        if storage.is_uri(path):
            path = str(Path(tmp) / "teacher.pt")
            storage.download(cfg.teacher, path)
        teacher = load_predictor(path, device)
    for _, t in teacher.members:
        if teacher.class_names != class_names or t.in_channels != cfg.in_channels or input_size(t) != input_size(cfg):
            raise ConfigError(f"teacher {cfg.teacher}: it answers {teacher.class_names} from {t.in_channels}-channel "
                              f"{input_size(t)} px input, this run {class_names} from {cfg.in_channels}-channel "
                              f"{input_size(cfg)} px; distil from a model trained on the same data and input size")
    return [net for net, _ in teacher.members]


class Run:
    """Where one copy of the loop runs: its rank among `world` DDP processes, its device, and where it reports.
    The collectives are DDP's when world > 1. Subclasses say where reports and checkpoints go."""

    rank, world, node = 0, 1, "local"
    device = torch.device("cpu")

    def resume(self) -> tuple[dict, dict] | None:
        """(training state, best model blob) of the last checkpoint, or None for a fresh start."""
        return None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def wrap(self, net: nn.Module) -> nn.Module:
        if self.world == 1:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def mean(self, total: float, count: int) -> float:
        return self.sum(total) / max(self.sum(count), 1)

    def gather(self, array: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return array
        parts = [None] * self.world
        dist.all_gather_object(parts, array)
        return np.concatenate(parts)

    def sync_buffers(self, net: nn.Module) -> None:
        """DDP broadcasts buffers at the start of each forward, so after the last training step each rank holds
        its own BatchNorm statistics; give every rank rank 0's before scoring."""
        if self.world > 1:
            for buf in getattr(net, "module", net).buffers():
                dist.broadcast(buf, 0)


class LocalRun(Run):
    """One plain process without Ray (tests, benchmarks, machines without Ray): reports go into `reports`, and the
    latest checkpoint into `checkpoint_dir` when one is given (so a second LocalRun on it resumes)."""

    def __init__(self, device: str | torch.device | None = None, checkpoint_dir: str | Path | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.reports: list[dict] = []

    def resume(self):
        if self.checkpoint_dir and (self.checkpoint_dir / STATE_FILE).is_file():
            return load_state(self.checkpoint_dir)
        return None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_dir:
            for name in (BEST_FILE, HISTORY_FILE, STATE_FILE):  # the state last: a resume looks for it
                storage.write_atomic(self.checkpoint_dir / name, (Path(checkpoint_dir) / name).read_bytes())


# ------------------------------------------------------------------------------------------- the pieces

def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the same memory. Arrays from Ray's object store are read-only; nothing writes to this tensor
    (batches are gathered copies), so torch's warning about that is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    per_rank = math.ceil(n / world)
    steps, rest = divmod(per_rank, batch_size)
    return max(1, steps + (1 if rest >= MIN_BATCH else 0))


def epoch_batches(y_np: np.ndarray, cfg: TrainConfig, rank: int, world: int, epoch: int):
    """This rank's shuffled index batches: a seeded permutation (DistributedSampler's scheme, with set_epoch),
    or class-balanced draws with replacement when class_balance is 'sampler'. Exactly steps_per_epoch of them."""
    n = len(y_np)
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    if cfg.class_balance == "sampler":
        w = torch.from_numpy(class_weights(y_np, int(y_np.max()) + 1)[y_np]).double()
        order = torch.multinomial(w, n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    mine = order[rank::world]
    if len(mine) < math.ceil(n / world):  # pad so every rank runs the same number of steps
        mine = torch.cat([mine, order[: math.ceil(n / world) - len(mine)]])
    for start in range(0, len(mine), cfg.batch_size):
        idx = mine[start:start + cfg.batch_size]
        if len(idx) >= MIN_BATCH:
            yield idx


# wsd: the last fifth of the run decays (at least one epoch); everything before it does not depend on the length.
WSD_DECAY = 0.2


def make_schedule(cfg: TrainConfig, optimizer, peak_lrs: list[float], total_steps: int, done_steps: int = 0,
                  epoch_steps: int | None = None):
    """Per-step schedule; `done_steps` > 0 resumes it (the optimizer state already carries initial_lr).

    wsd (warm-up, stable, decay): a linear warm-up over the first epoch, the peak rate, then a linear decay to 0
    over the last WSD_DECAY of the epochs. Until the decay starts the rate does not depend on how long the run is,
    so ASHA's rungs compare trials at the same point of the same schedule, whatever their budget (OneCycle and
    cosine stretch over the whole run: a trial judged at epoch 2 of 6 and one at epoch 2 of 20 are at different
    rates). `epoch_steps`: steps per epoch (default: total_steps / epochs)."""
    last = done_steps - 1
    if cfg.schedule == "wsd":
        per_epoch = epoch_steps or max(1, total_steps // max(cfg.epochs, 1))
        warm = per_epoch
        decay = max(per_epoch, int(round(WSD_DECAY * total_steps / per_epoch)) * per_epoch)
        decay_from = max(warm, total_steps - decay)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if step < decay_from:
                return 1.0
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_from))

        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group.setdefault("initial_lr", peak)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last)
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by (warm-up steps - 1): a short run (1 epoch of 4 batches at 0.25) would raise
        # ZeroDivisionError, so the warm-up takes at least 2 steps where there are 3 or more.
        warm = max(cfg.warmup_pct, 2 / total_steps) if total_steps >= 3 else min(cfg.warmup_pct, 0.25)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lrs, total_steps=total_steps,
                                                   pct_start=warm, last_epoch=last)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, last_epoch=last)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0, last_epoch=last)


def epoch_seed(cfg: TrainConfig, epoch: int, rank: int, fold: int = 0) -> int:
    """The seed of one epoch's sampling and augmentation on one rank, for one cv fold: runs with one seed repeat
    exactly, and no two ranks, folds or epochs draw the same numbers."""
    return cfg.seed * 1000 + epoch * 10 + rank + fold * 100_003


def set_trainable(groups: list[nn.Module], cfg: TrainConfig, epoch: int) -> int:
    """Returns how many stages (from the head) train this epoch (1-based). progressive: the head alone before
    epoch unfreeze_start, then one more stage every unfreeze_every epochs. The source recipe (head only for 10
    epochs, then layer4, layer3, layer2, then all, every 10 epochs) is unfreeze_start=11, unfreeze_every=10; the
    default unfreeze_start=10 starts one epoch sooner."""
    if cfg.freeze == "none":
        n = len(groups)
    elif cfg.freeze == "frozen":
        n = 1
    else:
        n = 1 if epoch < cfg.unfreeze_start else min(len(groups), 2 + (epoch - cfg.unfreeze_start) // cfg.unfreeze_every)
    for i, g in enumerate(groups):
        for p in g.parameters():
            p.requires_grad_(i < n)
    return n


def validate(net, x, y, cfg, run: Run, classes: int) -> tuple[dict, list[list[int]]]:
    """-> (val_ metrics, confusion matrix). Each rank scores its shard; predictions are gathered so every rank
    computes identical metrics over the whole split (Ray Tune only sees rank 0's dict, but early stopping runs on
    every rank)."""
    mine = torch.arange(run.rank, len(y), run.world)
    logits = predict(net, x[mine], cfg, run.device)
    loss = F.cross_entropy(logits, y[mine].to(run.device), reduction="sum").item() if len(mine) else 0.0
    y_true = run.gather(y[mine].numpy())
    y_pred = run.gather(logits.argmax(1).cpu().numpy())
    return ({"val_loss": run.sum(loss) / max(len(y_true), 1), **metrics(y_true, y_pred, "val")},
            confusion(y_true, y_pred, classes))
