"""The one training loop, shared by pretrain, finetune and train_emotion.

AdamW (weight decay on >=2-D weights only), or Muon for the blocks' matrices and AdamW for the rest,
warmup-stable-decay learning rate, gradient clipping, gradient accumulation normalised by the *total* target
count of all micro-batches (so k micro-batches give exactly the gradient of one k-times batch),
fp32/bf16/fp16 autocast (GradScaler for fp16 on CUDA), optional gradient checkpointing and torch.compile, DDP
under torchrun, dvclive logging, and resumable checkpoints.
A non-finite loss stops the phase before the optimizer step, so broken weights are never written.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from persona_lm.errors import PersonaError
from persona_lm.train import checkpoint, distributed
from persona_lm.train.batches import IGNORE

log = logging.getLogger("persona_lm.train")


class TrainingError(PersonaError):
    pass


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed buffers back to the OS. Otherwise every training step maps its
    activation buffers afresh and page-faults them in, which costs ~10% of a small model's CPU step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: serve allocations up to 32 MB from the heap
    libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap for reuse


def resolve_device(pref: str) -> str:
    if pref != "auto":
        if pref == "cuda" and not torch.cuda.is_available():
            raise TrainingError("device: cuda requested but no CUDA device is available")
        if pref == "mps" and not torch.backends.mps.is_available():
            raise TrainingError("device: mps requested but MPS is not available")
        return pref
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(pref: str, device: str) -> torch.dtype:
    """auto = bf16 on CUDA when supported, else fp16 on CUDA, fp32 elsewhere (CPU autocast gains nothing here)."""
    if pref == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[pref]


def lr_at(step: int, phase) -> float:
    """Linear warmup, then lr held until the last `cooldown` share of the remaining steps, which decay it to
    min_lr. Holding the peak and decaying late (warmup-stable-decay) beats decaying from the start: at
    nanoGPT's shakespeare config it lowers val loss by ~0.05 over its cosine schedule (bench/train_throughput.py)."""
    if step < phase.warmup_iters:
        return phase.lr * (step + 1) / (phase.warmup_iters + 1)
    start = phase.warmup_iters + round((1.0 - phase.cooldown) * (phase.max_iters - phase.warmup_iters))
    if step < start:
        return phase.lr
    progress = min((step - start) / max(1, phase.max_iters - start), 1.0)
    if phase.decay == "cosine":
        return phase.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (phase.lr - phase.min_lr)
    return phase.lr + progress * (phase.min_lr - phase.lr)


class Optimizers:
    """Several optimizers stepped as one. `param_groups` is all of theirs (the loop sets each group's lr, and
    GradScaler unscales and checks every gradient in one call, so an inf anywhere skips all the steps together);
    the state dict holds each optimizer's under its name, plain containers that load with weights_only=True."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the weights Muon trains: trained, exactly 2-D, inside the transformer blocks. Muon makes a
    matrix's update orthogonal, right for a hidden layer's linear map; the token embedding and output head (a
    lookup table and the logit layer), the persona embedding, the emotion head, norms, biases, and any >2-D
    tensor (stacked expert weights) stay with AdamW, as in modded-nanogpt (Jordan et al. 2024)."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")]


def make_optimizer(model: torch.nn.Module, phase, device: str) -> torch.optim.AdamW | Optimizers:
    """AdamW over every trained weight (decay on >=2-D ones only), or with `optimizer: muon` Muon over the
    hidden matrices and AdamW over the rest. Muon's group carries `lr_scale` = muon_lr / lr, so `set_lr` moves
    its peak muon_lr along the same schedule."""
    hidden = set(hidden_matrices(model)) if phase.optimizer == "muon" else set()
    if hidden and any("lora_" in name for name in hidden):
        raise TrainingError("optimizer: muon does not train LoRA adapters (set optimizer: adamw or lora.r: 0)")
    params = [p for name, p in model.named_parameters() if p.requires_grad and name not in hidden]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": phase.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel (CPU, CUDA, MPS) replaces a dozen passes over every parameter with one
    adamw = torch.optim.AdamW(groups, lr=phase.lr, betas=(phase.beta1, phase.beta2), fused=True)
    if phase.optimizer == "adamw":
        return adamw
    if not hidden:  # e.g. a frozen backbone: nothing for Muon, and torch.optim refuses an empty optimizer
        return Optimizers(adamw=adamw)
    lr = phase.muon_lr or phase.lr
    wd = phase.weight_decay if phase.muon_weight_decay is None else phase.muon_weight_decay
    # torch's own Muon; its decay is lr * wd per step with lr before the per-matrix scale. Its Newton-Schulz runs
    # in bf16 and costs the same at any batch size: ~15 ms on top of a 38 ms step of nanoGPT's shakespeare-char
    # config on 2 CPU cores, which Muon repays by reaching nanoGPT's val loss in ~3x fewer steps (bench/speedrun.py)
    muon = torch.optim.Muon([{"params": [p for name, p in model.named_parameters() if name in hidden],
                              "lr_scale": lr / phase.lr}],
                            lr=lr, weight_decay=wd, momentum=phase.muon_momentum, nesterov=phase.muon_nesterov,
                            ns_steps=phase.muon_ns_steps, adjust_lr_fn=phase.muon_adjust_lr)
    return Optimizers(adamw=adamw, muon=muon)


def set_lr(optimizer, lr: float) -> None:
    """Set the schedule's lr on every group, times the group's `lr_scale` (Muon's muon_lr / lr; 1 elsewhere)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's and torch.compile's wrappers: where its forward leaves `aux_loss`."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def batch_loss(model, batch: dict, n_tokens: float, n_labels: float, lm_weight: float,
               class_weights: torch.Tensor | None = None):
    """Sum-reduced losses divided by the global counts: the pieces of one exact mean over the whole step.

    `class_weights` (n_emotions,) scales each labelled reply's emotion loss by its label's weight; the sum is
    still divided by the label count, so balanced weights (mean 1 over the train labels) keep the loss scale.

    A mixture-of-experts model in training adds its routers' load-balancing loss (model.MoE), times
    `router_aux_loss_coef` and the micro-batch's share of the step's targets: a mean over its own tokens, so
    weighted by its share, k micro-batches weigh as much as one batch of all of them. It is reported as "aux",
    unweighted (the loop logs it as train/router_aux; 1 = balanced); "lm" (the val loss) stays the
    language-model loss alone."""
    logits, emo = model(batch["x"], persona=batch.get("persona"), emotion_index=batch.get("emotion_index"))
    lm = F.cross_entropy(logits.float().flatten(0, -2), batch["y"].flatten(), ignore_index=IGNORE,
                         reduction="sum") / max(n_tokens, 1.0)
    if emo is None:
        loss, parts = lm, {"lm": lm.detach()}
    else:
        em = F.cross_entropy(emo.float(), batch["emotion_label"], weight=class_weights,
                             reduction="sum") / max(n_labels, 1.0)
        correct = (emo.argmax(-1) == batch["emotion_label"]).sum().detach()
        loss, parts = em + lm_weight * lm, {"lm": lm.detach(), "emotion": em.detach(), "correct": correct}
    raw = unwrap(model)
    aux = getattr(raw, "aux_loss", None)
    if aux is not None:
        share = (batch["y"] != IGNORE).sum() / max(n_tokens, 1.0)
        loss = loss + raw.cfg.router_aux_loss_coef * share * aux
        parts["aux"] = aux.detach()
    return loss, parts


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class PhaseResult:
    step: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    resumed_from: int | None
    extra: dict
    main: bool = True  # False on the non-zero ranks of a DDP run, which must not write outputs


@torch.no_grad()
def evaluate(model, batches, phase, device, autocast, lm_weight: float,
             class_weights: torch.Tensor | None = None) -> dict:
    model.eval()
    totals = {"lm": 0.0, "emotion": 0.0, "correct": 0.0, "labels": 0.0}
    for i in range(phase.eval_iters):
        batch = to_device(batches.get("val", i), device)
        n_tok = float((batch["y"] != IGNORE).sum())
        n_lab = float(batch["emotion_label"].numel()) if "emotion_label" in batch else 0.0
        with autocast:
            _, parts = batch_loss(model, batch, n_tok, n_lab, lm_weight, class_weights)
        totals["lm"] += float(parts["lm"])
        if "emotion" in parts:
            totals["emotion"] += float(parts["emotion"])
            totals["correct"] += float(parts["correct"])
            totals["labels"] += n_lab
    model.train()
    out = {"lm_loss": totals["lm"] / phase.eval_iters}
    if totals["labels"]:
        out["emotion_loss"] = totals["emotion"] / phase.eval_iters
        out["emotion_acc"] = totals["correct"] / totals["labels"]
    out["loss"] = out.get("emotion_loss", 0.0) + (lm_weight if totals["labels"] else 1.0) * out["lm_loss"]
    return out


def train(model: torch.nn.Module, phase, batches, ckpt_dir: Path, params_hash: str, meta: dict,
          name: str, lm_weight: float = 1.0, class_weights: torch.Tensor | None = None) -> PhaseResult:
    """Run optimizer steps up to `phase.end_step` (max_iters, or an earlier stop_at with the schedule still
    planned over max_iters), resuming from the newest intact checkpoint in `ckpt_dir` at or before that step that
    was written with the same `params_hash` (params and input data), else starting fresh. `class_weights`
    weigh the emotion loss per label, in training and in the val loss alike."""
    from dvclive import Live
    from tqdm import tqdm

    keep_freed_memory()
    device = resolve_device(phase.device)
    dd = distributed.setup(device)
    if dd.enabled and device == "cuda":
        device = f"cuda:{dd.local_rank}"
    dtype = resolve_precision(phase.precision, device.split(":")[0])
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.startswith("cuda"))

    raw = model.to(device)
    if class_weights is not None:
        class_weights = class_weights.to(device=device, dtype=torch.float32)
    raw.grad_checkpointing = phase.grad_checkpointing
    optimizer = make_optimizer(raw, phase, device.split(":")[0])
    step, resumed, train_loss = 0, None, float("nan")
    end = phase.end_step
    found = checkpoint.latest(ckpt_dir, params_hash, end)
    if found:
        path, ck_meta = found
        checkpoint.load_weights(raw, path / "model.safetensors")
        state = checkpoint.load_state(path)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if dd.main:
            torch.set_rng_state(state["rng"])
        step = resumed = int(state["step"])
        train_loss = float(state.get("train_loss", float("nan")))  # what a run resumed at its end reports
        log.info("%s: resuming from %s (step %d of %d)", name, path, step, end)
    elif ckpt_dir.exists() and dd.main:
        checkpoint.clear(ckpt_dir)
    if not dd.main:
        torch.manual_seed(meta.get("seed", 0) + 7919 * dd.rank + step)

    fwd = torch.compile(raw) if phase.compile else raw
    if dd.enabled:
        # memory attention's bias gets no gradient from a batch of single windows (phase 3 mixes both kinds), nor
        # does an expert that no token of the batch was routed to
        cfg = getattr(raw, "cfg", None)
        unused = bool(getattr(cfg, "memory_layers", ())) or getattr(cfg, "mlp", None) == "moe"
        fwd = torch.nn.parallel.DistributedDataParallel(
            fwd, device_ids=[dd.local_rank] if device.startswith("cuda") else None, find_unused_parameters=unused)
    params = [p for p in raw.parameters() if p.requires_grad]

    live = Live(dir=str(meta["live_dir"]), resume=resumed is not None, save_dvc_exp=False, dvcyaml=None,
                report=None) if dd.main else None
    bar = tqdm(total=end, initial=step, desc=name, disable=not dd.main, file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, dynamic_ncols=True)
    log_every = max(1, min(10, phase.eval_interval))
    val = {}
    tokens, t0, tok_rate = 0, time.perf_counter(), 0.0
    fwd.train()
    while step < end:
        lr = lr_at(step, phase)
        set_lr(optimizer, lr)
        micro = [batches.get("train", step * phase.grad_accum + i, dd.rank) for i in range(phase.grad_accum)]
        n_tokens = distributed.all_sum(float(sum(int((b["y"] != IGNORE).sum()) for b in micro)), dd, device)
        n_labels = distributed.all_sum(float(sum(b["emotion_label"].numel() for b in micro if "emotion_label" in b)), dd, device)
        step_loss, router_aux = 0.0, None
        for i, batch in enumerate(micro):
            batch = to_device(batch, device)
            sync = fwd.no_sync() if dd.enabled and i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss, parts = batch_loss(fwd, batch, n_tokens, n_labels, lm_weight, class_weights)
                # DDP averages gradients over ranks; the counts above are global, so scale back up.
                scaler.scale(loss * dd.world_size).backward()
            step_loss += float(loss.detach())
            if "aux" in parts:  # this rank's mean over the micro-batches, for the log
                router_aux = (router_aux or 0.0) + float(parts["aux"]) / len(micro)
            tokens += batch["x"].numel()
        step_loss = distributed.all_sum(step_loss, dd, device)
        if not math.isfinite(step_loss):
            bar.close()
            raise TrainingError(f"{name}: loss became {step_loss} at step {step + 1}; stopping without writing "
                                f"weights (try a lower {name}.lr, grad_clip > 0, or precision fp32)")
        if phase.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = step_loss
        bar.update(1)
        if step % log_every == 0 or step == end:
            elapsed = time.perf_counter() - t0
            tok_rate = tokens * dd.world_size / max(elapsed, 1e-9)
            tokens, t0 = 0, time.perf_counter()
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_rate:,.0f}", refresh=False)
            if live:
                live.step = step
                live.log_metric("train/loss", train_loss)
                live.log_metric("lr", lr)
                live.log_metric("tokens_per_s", tok_rate)
                if router_aux is not None:
                    live.log_metric("train/router_aux", router_aux)
        if step % phase.eval_interval == 0 or step == end:
            val = evaluate(fwd, batches, phase, device, autocast, lm_weight, class_weights)
            if live:
                live.step = step
                for k, v in val.items():
                    live.log_metric(f"val/{k}", v)
        if live and (step % log_every == 0 or step % phase.eval_interval == 0 or step == end):
            live.next_step()
        if step % phase.ckpt_interval == 0 or step == end:
            if dd.main:
                state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": step,
                         "train_loss": train_loss, "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
                checkpoint.save(ckpt_dir, step, raw, state, {**meta, "params_hash": params_hash,
                                "live_dir": str(meta["live_dir"])}, phase.keep_checkpoints)
            distributed.barrier(dd)
    bar.close()
    if live:
        live.end()
    if not val:
        val = evaluate(fwd, batches, phase, device, autocast, lm_weight, class_weights)
    raw.to("cpu")
    distributed.cleanup(dd)
    return PhaseResult(step=step, train_loss=train_loss, val_loss=val.get("loss", float("nan")),
                       tokens_per_s=tok_rate, resumed_from=resumed,
                       extra={k: v for k, v in val.items() if k != "loss"}, main=dd.main)
