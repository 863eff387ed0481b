"""Model and trainer: a bag-of-words encoder followed by any classifier head with nn.Linear's call convention
(nn.Linear, torch_xmc.GroupSharedFanIn), trained with BCE, evaluated with top-k metrics, checkpointed so that a
resumed run reproduces the uninterrupted one exactly.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as XF
from . import metrics
from .data import XMCData, gather_rows
from .headtail import HeadTailFanIn, head_size
from .modules import GroupSharedFanIn
from .optim import SGDSR, loss_with_step
from .rewire import Rewirer


class BowEncoder(nn.Module):
    """Sparse bag of words -> H: EmbeddingBag(sum, per-sample weights) + bias, ReLU, dropout."""

    def __init__(self, num_features: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.EmbeddingBag(num_features, hidden, mode="sum")
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(hidden))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices int64 [nnz], offsets int64 [B] (row starts), weights float32 [nnz] -> float32 [B, H]."""
        h = self.embed(indices, offsets, per_sample_weights=weights) + self.bias
        return self.dropout(F.relu(h))


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints)."""

    num_features: int
    num_labels: int
    hidden: int = 512
    dropout: float = 0.5
    head: str = "dense"  # "dense" (nn.Linear) or "gsffi" (GroupSharedFanIn)
    fan_in: int = 64
    group_size: int = 32
    head_fraction: float = 0.05  # "headtail": share of the labels (the most frequent) in the dense head
    grouping: str = "none"  # GSFFI label order: "none" (user order), "frequency" or "semantic" (set in fit)


class XMCModel(nn.Module):
    """encoder (sparse features -> H) followed by head (H -> L, nn.Linear call convention)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, indices, offsets, weights):
        return self.head(self.encoder(indices, offsets, weights))


def build_model(cfg: ModelConfig) -> XMCModel:
    if cfg.head == "dense":
        head = nn.Linear(cfg.hidden, cfg.num_labels)
    elif cfg.head == "gsffi":
        head = GroupSharedFanIn(cfg.hidden, cfg.num_labels, cfg.fan_in, cfg.group_size)
    elif cfg.head == "headtail":
        head = HeadTailFanIn(cfg.hidden, cfg.num_labels, cfg.fan_in, cfg.group_size,
                             head_size(cfg.num_labels, cfg.head_fraction, cfg.group_size))
    else:
        raise ValueError(f"head must be 'dense', 'gsffi' or 'headtail', got {cfg.head!r}")
    if cfg.head == "gsffi" and cfg.grouping != "none":  # a label order needs the head/tail module, with no head
        head = HeadTailFanIn(cfg.hidden, cfg.num_labels, cfg.fan_in, cfg.group_size, 0)
    for layer in (head.head, head.tail) if isinstance(head, HeadTailFanIn) else ():
        if layer is not None and layer.bias is not None:
            nn.init.constant_(layer.bias, -math.log(cfg.num_labels))
    if getattr(head, "bias", None) is not None:
        # start every label at a prior of ~1/L: with bias 0 the summed BCE begins at L ln 2 per row and the
        # first epochs go into pushing all logits down (measured: synthetic 20k labels, P@1 13 -> 82 at 3 epochs)
        nn.init.constant_(head.bias, -math.log(cfg.num_labels))
    return XMCModel(BowEncoder(cfg.num_features, cfg.hidden, cfg.dropout), head)


def normalized(data: XMCData) -> XMCData:
    """A copy of data with each row's feature values scaled to unit L2 norm (rows of zeros stay zero)."""
    rows = torch.repeat_interleave(torch.arange(data.num_points), data.feat_indptr.diff())
    sq = torch.zeros(data.num_points).index_add_(0, rows, data.feat_values.float() ** 2)
    scale = sq.sqrt().clamp(min=1e-12).reciprocal()[rows]
    return XMCData(data.feat_indptr, data.feat_indices, data.feat_values * scale, data.label_indptr,
                   data.label_indices, data.num_features, data.num_labels)


@dataclass
class Batch:
    indices: torch.Tensor  # int64 [nnz] feature ids
    offsets: torch.Tensor  # int64 [B] row starts into indices
    weights: torch.Tensor  # float32 [nnz]
    label_indptr: torch.Tensor  # int64 [B+1]
    label_indices: torch.Tensor  # int64 [n_pos]


def make_batch(data: XMCData, rows: torch.Tensor) -> Batch:
    fpos, fptr = gather_rows(data.feat_indptr, rows)
    lpos, lptr = gather_rows(data.label_indptr, rows)
    return Batch(data.feat_indices[fpos], fptr[:-1], data.feat_values[fpos], lptr, data.label_indices[lpos])


class _SparseTargetBCE(torch.autograd.Function):
    """sum of BCE-with-logits over [B, L] logits whose targets are 1 at (rows, cols) and 0 elsewhere, without a
    dense target tensor: sum softplus(x) - sum x[rows, cols]; gradient sigmoid(x) - target."""

    @staticmethod
    def forward(ctx, logits, rows, cols):
        ctx.save_for_backward(logits, rows, cols)
        return F.softplus(logits).sum() - logits[rows, cols].sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, cols = ctx.saved_tensors
        grad = torch.sigmoid(logits)
        grad[rows, cols] -= 1.0
        return grad.mul_(grad_out), None, None


def bce_loss(head: nn.Module, hidden: torch.Tensor, label_indptr: torch.Tensor, label_indices: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits summed over labels, averaged over the batch; the [B, L] logits are materialised, the
    targets are not (the positives are given as CSR: label_indptr [B+1], label_indices).

    The one place that turns (hidden [B, H], positives) into a loss: a fused op that never builds B x L
    replaces this function alone."""
    logits = head(hidden)
    rows = torch.repeat_interleave(torch.arange(hidden.shape[0]), label_indptr.diff())
    return _SparseTargetBCE.apply(logits, rows, label_indices) / hidden.shape[0]


def fused_bce_loss(head: nn.Module, hidden: torch.Tensor, label_indptr: torch.Tensor,
                   label_indices: torch.Tensor, optimizer: SGDSR | None = None) -> torch.Tensor:
    """bce_loss through the fused loss op, which never builds [B, L] logits: GroupSharedFanIn.loss, and for
    nn.Linear functional.linear_loss (the same kernels with fan_in = H). Other heads fall back to bce_loss.
    optimizer: an SGDSR over the head's parameters that takes its step inside the fused loss (no weight-sized
    gradient; the head's parameters get no .grad)."""
    if isinstance(head, (GroupSharedFanIn, HeadTailFanIn)):
        return head.loss(hidden, label_indptr, label_indices, optimizer=optimizer)
    if isinstance(head, nn.Linear):
        def linear(**update):
            return XF.linear_loss(hidden, head.weight, head.bias, label_indptr, label_indices, update=update or None)
        return linear() if optimizer is None else loss_with_step(optimizer, head.weight, head.bias, linear)
    if optimizer is not None:
        raise TypeError(f"the optimizer step inside the loss needs a fused head, got {type(head).__name__}")
    return bce_loss(head, hidden, label_indptr, label_indices)


LOSSES = {"fused": fused_bce_loss, "dense": bce_loss}


def _fused_topk(head: nn.Module, hidden: torch.Tensor, k: int) -> torch.Tensor | None:
    if isinstance(head, (GroupSharedFanIn, HeadTailFanIn)):
        return head.topk(hidden, k)[1]
    if isinstance(head, nn.Linear):
        return XF.linear_topk(hidden, head.weight, head.bias, k)[1]
    return None


def _head_dtype(model: XMCModel) -> torch.dtype:
    """The head's parameter dtype: the encoder's float32 output is cast to it (a bf16 head runs in bf16)."""
    return next(model.head.parameters()).dtype


@torch.no_grad()
def predict_topk(model: XMCModel, data: XMCData, k: int = 5, max_elements: int = 1 << 24,
                 progress: bool = False, fused: bool = True) -> torch.Tensor:
    """int64 [N, k] label ids, best first. With fused=True (and a GSFFI or nn.Linear head) through the fused
    top-k op, in chunks of 4096 rows, without logits; otherwise in row chunks of at most max_elements logits."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    chunk = 4096 if fused else max(1, max_elements // data.num_labels)
    out = torch.empty(data.num_points, k, dtype=torch.int64)
    for r0 in tqdm(range(0, data.num_points, chunk), desc="predict", leave=False, disable=not progress):
        rows = torch.arange(r0, min(r0 + chunk, data.num_points))
        b = make_batch(data, rows)
        hidden = model.encoder(b.indices, b.offsets, b.weights).to(_head_dtype(model))
        ids = _fused_topk(model.head, hidden, k) if fused else None
        out[rows] = ids.long() if ids is not None else model.head(hidden).topk(k, dim=1).indices
    model.train(was_training)
    return out


def evaluate_model(model: XMCModel, data: XMCData, inv_prop: torch.Tensor | None = None, ks=(1, 3, 5),
                   progress: bool = False) -> dict[str, float]:
    """Metrics (percent) of model on data (features already normalised, see ``normalized``)."""
    topk = predict_topk(model, data, max(ks), progress=progress)
    return metrics.evaluate(topk, data.label_indptr, data.label_indices, data.num_labels, inv_prop, ks)


@dataclass
class TrainConfig:
    epochs: float = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine", "linear" (decay to 0 after warmup) or "constant"
    loss: str = "fused"  # "fused" (fused_bce_loss, no [B, L] logits) or "dense" (bce_loss)
    eval_every: int = 0  # steps between evaluations; 0: at the end of every epoch
    eval_points: int = 0  # evaluate on the first n test points (0: all)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end), needs a checkpoint path
    seed: int = 0
    progress: bool = True
    rewire_interval: int = 0  # GSFFI heads: steps between rewirings (0: static), see torch_xmc.rewire
    rewire_fraction: float = 0.2  # share of connections rewired at the first rewiring, cosine-decayed to 0
    rewire_end: float = 2 / 3  # share of the training steps after which the connections stay fixed
    head_precision: str = "fp32"  # "bf16": head weights in bfloat16, trained by torch_xmc.optim.SGDSR (no fp32 copy)
    head_lr: float = 32.0  # "bf16": SGDSR learning rate (momentum 0.9) of the head; the encoder keeps AdamW at lr
    # "bf16" with loss "fused": "inside" takes the head's SGDSR step inside the fused loss (no weight-sized
    # gradient, bitwise the same result), "after" stores the head's gradients and steps after backward
    head_update: str = "inside"


def _lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - t)
        return 1.0

    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
    return f


@dataclass
class TrainResult:
    step: int
    history: list = field(default_factory=list)  # {"step", "epoch", "loss", metrics...} per evaluation
    train_seconds: float = 0.0  # training steps only (no evaluation)
    epochs_done: float = 0.0


class Trainer:
    """Trains an XMCModel with AdamW, warmup + schedule, seeded shuffling, periodic evaluation and checkpoints.

    Determinism: the order of the points in epoch e is randperm(N) from a generator seeded by (seed, e), and
    dropout draws from torch's global generator, whose state the checkpoint keeps. So a run resumed from a
    checkpoint at step s takes exactly the steps the uninterrupted run takes after s. Construction seeds torch's
    global generator with cfg.seed (the model's initialisation and dropout draw from it).
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig):
        if train_cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {train_cfg.loss!r}")
        if train_cfg.head_update not in ("inside", "after"):
            raise ValueError(f"head_update must be 'inside' or 'after', got {train_cfg.head_update!r}")
        self.model_cfg, self.cfg, self.loss_fn = model_cfg, train_cfg, LOSSES[train_cfg.loss]
        torch.manual_seed(train_cfg.seed)
        self.model = build_model(model_cfg)
        # fused: one pass over each tensor, ~8x faster than the per-op AdamW on CPU for a large embedding table
        self.head_optimizer = self.head_scheduler = None
        if train_cfg.head_precision == "bf16":  # bf16 head, SGD + momentum with stochastic rounding, no fp32 copy
            self.model.head.to(torch.bfloat16)
            self.head_optimizer = SGDSR(self.model.head.parameters(), lr=train_cfg.head_lr, momentum=0.9,
                                        seed=train_cfg.seed)
        params = self.model.encoder.parameters() if self.head_optimizer else self.model.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                           fused=True)
        self.scheduler = None  # needs the step count, known in fit
        self.rewirer, self._pending_rewirer = None, None  # likewise (cfg.rewire_interval > 0)
        self._pending = None  # optimizer and scheduler states of a checkpoint, applied in fit
        self.step = 0
        self.history: list = []
        self.train_seconds = 0.0
        self._loss_sum, self._loss_n = 0.0, 0  # training loss since the last evaluation
        self.extra: dict = {}  # stored in checkpoints as is (data description, label counts, ...)

    def _make_scheduler(self, total_steps: int):
        lam = _lr_lambda(self.cfg.schedule, self.cfg.warmup_steps, total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        if self.head_optimizer is not None:
            self.head_scheduler = torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, lam)

    def _epoch_order(self, epoch: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)

    def fit(self, train: XMCData, test: XMCData | None = None, inv_prop: torch.Tensor | None = None,
            checkpoint: str | None = None, stop_at: int | None = None) -> TrainResult:
        """Train for cfg.epochs over train (features normalised, see ``normalized``) from self.step on.
        Evaluates on test every cfg.eval_every steps (or each epoch); saves to checkpoint every
        cfg.checkpoint_every steps and at the end; stop_at ends early at that step (as an interruption would)."""
        from tqdm.auto import tqdm

        n, bs = train.num_points, self.cfg.batch_size
        per_epoch = math.ceil(n / bs)
        total = max(1, round(self.cfg.epochs * per_epoch))
        head = self.model.head
        if self.step == 0 and isinstance(head, HeadTailFanIn):  # label order (and head labels) from the data
            head.order_labels(train, self.model_cfg.grouping if self.model_cfg.grouping != "none" else "frequency",
                              self.cfg.seed)
        if self.scheduler is None and self.cfg.rewire_interval:
            layer = head.tail if isinstance(head, HeadTailFanIn) else head
            self.rewirer = Rewirer(layer, self.head_optimizer or self.optimizer, interval=self.cfg.rewire_interval,
                                   end=int(self.cfg.rewire_end * total), fraction=self.cfg.rewire_fraction,
                                   seed=self.cfg.seed)
            if self._pending_rewirer is not None:
                self.rewirer.load_state_dict(self._pending_rewirer)
        if self.scheduler is None:
            self._make_scheduler(total)
            if self._pending is not None:  # resumed: restore after the scheduler has set its initial lr
                self.optimizer.load_state_dict(self._pending["optimizer"])
                self.scheduler.load_state_dict(self._pending["scheduler"])
                if self.head_optimizer is not None:
                    self.head_optimizer.load_state_dict(self._pending["head_optimizer"])
                    self.head_scheduler.load_state_dict(self._pending["head_scheduler"])
                self._pending = None
        end = total if stop_at is None else min(stop_at, total)
        eval_every = self.cfg.eval_every or per_epoch
        test_eval = test
        if test is not None and self.cfg.eval_points and self.cfg.eval_points < test.num_points:
            test_eval = test.subset(torch.arange(self.cfg.eval_points))
        self.model.train()
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not self.cfg.progress,
                   dynamic_ncols=True)
        order, order_epoch = None, -1
        while self.step < end:
            epoch, i = divmod(self.step, per_epoch)
            if order_epoch != epoch:
                order, order_epoch = self._epoch_order(epoch, n), epoch
            rows = order[i * bs:(i + 1) * bs]
            t0 = time.perf_counter()
            b = make_batch(train, rows)
            hidden = self.model.encoder(b.indices, b.offsets, b.weights).to(_head_dtype(self.model))
            inside = (self.head_optimizer is not None and self.loss_fn is fused_bce_loss
                      and self.cfg.head_update == "inside")
            extra = {"optimizer": self.head_optimizer} if inside else {}  # else the head steps after backward
            loss = self.loss_fn(self.model.head, hidden, b.label_indptr, b.label_indices, **extra)
            self.optimizer.zero_grad(set_to_none=True)
            if self.head_optimizer is not None:
                self.head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.head_optimizer is not None:
                self.head_optimizer.step()
                self.head_scheduler.step()
            if self.rewirer is not None:
                self.rewirer.step()
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self._loss_sum, self._loss_n = self._loss_sum + loss.item(), self._loss_n + 1
            bar.update(1)
            bar.set_postfix(epoch=f"{self.step / per_epoch:.2f}", loss=f"{loss.item():.3f}",
                            lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if test_eval is not None and (self.step % eval_every == 0 or self.step == total):
                m = evaluate_model(self.model, test_eval, inv_prop)
                self.history.append({"step": self.step, "epoch": self.step / per_epoch,
                                     "loss": self._loss_sum / max(self._loss_n, 1), **m})
                self._loss_sum, self._loss_n = 0.0, 0
                if self.cfg.progress:
                    bar.write(f"step {self.step} epoch {self.step / per_epoch:.2f}: "
                              + " ".join(f"{k} {m[k]:.2f}" for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5") if k in m))
            if checkpoint and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save(checkpoint)
        bar.close()
        if checkpoint:
            self.save(checkpoint)
        return TrainResult(self.step, self.history, self.train_seconds, self.step / per_epoch)

    def state_dict(self) -> dict:
        return {
            "model_config": asdict(self.model_cfg),
            "train_config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "head_optimizer": None if self.head_optimizer is None else self.head_optimizer.state_dict(),
            "head_scheduler": None if self.head_scheduler is None else self.head_scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": self.step,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "loss_since_eval": (self._loss_sum, self._loss_n),
            "extra": self.extra,
            "rewirer": None if self.rewirer is None else self.rewirer.state_dict(),
        }

    def save(self, path: str) -> None:
        """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, **overrides) -> "Trainer":
        """A Trainer in the exact state saved at path (train-config fields can be overridden, e.g. progress)."""
        ck = torch.load(path, map_location="cpu", weights_only=False)
        tc = TrainConfig(**{**ck["train_config"], **overrides})
        t = cls(ModelConfig(**ck["model_config"]), tc)
        t.model.load_state_dict(ck["model"])
        t.optimizer.load_state_dict(ck["optimizer"])
        if t.head_optimizer is not None:
            t.head_optimizer.load_state_dict(ck["head_optimizer"])
        if ck["scheduler"] is not None:
            # the schedule's length is known in fit (it depends on the data size): restore there
            t._pending = {"optimizer": ck["optimizer"], "scheduler": ck["scheduler"],
                          "head_optimizer": ck.get("head_optimizer"), "head_scheduler": ck.get("head_scheduler")}
        t.step, t.history, t.train_seconds, t.extra = ck["step"], ck["history"], ck["train_seconds"], ck["extra"]
        t._loss_sum, t._loss_n = ck["loss_since_eval"]
        t._pending_rewirer = ck.get("rewirer")
        torch.set_rng_state(ck["rng"])
        return t


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> int:
    """Reset the process's peak-RSS mark (Linux: /proc/self/clear_refs) and return the current RSS in bytes;
    0 where /proc is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return 0
    return _rss_bytes("VmRSS")


def peak_rss() -> int:
    """Peak RSS in bytes since the last reset_peak_rss (0 where /proc is unavailable)."""
    try:
        return _rss_bytes("VmHWM")
    except OSError:
        return 0


def head_training_bytes(head: nn.Module) -> int:
    """Bytes the head holds in training with AdamW: parameters, their gradients and two moments, and buffers
    (GSFFI's indices)."""
    params = sum(p.numel() * p.element_size() for p in head.parameters())
    buffers = sum(b.numel() * b.element_size() for b in head.buffers())
    return 4 * params + buffers


def measure_run(model_cfg: ModelConfig, train_cfg: TrainConfig, train: XMCData, test: XMCData,
                inv_prop: torch.Tensor | None = None, isolate: bool = True) -> dict:
    """Train, evaluate on test, and measure: {"metrics", "history", "head_params", "head_bytes",
    "peak_bytes" (peak RSS above the level before training), "steps", "train_seconds", "seconds_per_step",
    "seconds_per_epoch", "eval_seconds", "model_config", "train_config"}.

    isolate=True runs it in a fresh (spawned) process with torch's current thread count, so that memory the
    allocator kept from earlier runs neither hides nor inflates this run's peak."""
    if not isolate:
        return _measure(model_cfg, train_cfg, train, test, inv_prop)
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(_measure_in_child, (model_cfg, train_cfg, train, test, inv_prop, torch.get_num_threads()))
    finally:
        pool.close()  # close + join, not the context manager's terminate, which leaks the pool's semaphores
        pool.join()


def _measure_in_child(model_cfg, train_cfg, train, test, inv_prop, threads):
    torch.set_num_threads(threads)
    return _measure(model_cfg, train_cfg, train, test, inv_prop)


def _warm_up(model_cfg, train_cfg):
    """A few steps of a tiny model with the same head kind: pages in the library code, thread pools and
    allocator arenas that any run touches, so they do not count as this run's memory."""
    tiny = XMCData(torch.arange(9) * 2, torch.arange(16) % 8, torch.ones(16), torch.arange(9), torch.arange(8) * 7,
                   8, 64)
    cfg = replace(model_cfg, num_features=8, num_labels=64, hidden=16, fan_in=2)
    state = torch.get_rng_state()
    Trainer(cfg, replace(train_cfg, epochs=2, batch_size=4, progress=False)).fit(tiny, tiny)
    torch.set_rng_state(state)


def _measure(model_cfg, train_cfg, train, test, inv_prop):
    _warm_up(model_cfg, train_cfg)
    base = reset_peak_rss()
    trainer = Trainer(model_cfg, train_cfg)
    result = trainer.fit(train, test, inv_prop)
    t0 = time.perf_counter()
    final = evaluate_model(trainer.model, test, inv_prop, progress=train_cfg.progress)
    eval_seconds = time.perf_counter() - t0
    peak = max(0, peak_rss() - base)
    head = trainer.model.head
    return {
        "metrics": final,
        "history": result.history,
        "head_params": sum(p.numel() for p in head.parameters()),
        "head_bytes": head_training_bytes(head),
        "peak_bytes": peak,
        "steps": result.step,
        "train_seconds": result.train_seconds,
        "seconds_per_step": result.train_seconds / max(result.step, 1),
        "seconds_per_epoch": result.train_seconds / max(result.epochs_done, 1e-9),
        "eval_seconds": eval_seconds,
        "model_config": asdict(model_cfg),
        "train_config": asdict(train_cfg),
    }
