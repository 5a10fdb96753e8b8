"""Checkpoints: save, find, verify and load — the only code that touches checkpoint files.

A checkpoint is a folder `step_NNNNNNN/` holding `model.safetensors` (weights), `state.pt` (optimizer, RNG
and data-sampler state, step; plain tensors and containers so it loads with `weights_only=True`) and
`meta.json` (model config, params hash, git SHA, and a sha256 of the two other files). It is written into a
temporary folder and renamed into place, so a kill mid-write leaves no checkpoint rather than a broken one;
a folder whose hashes do not match (truncated or corrupted later) is reported and skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from persona_lm.io import atomic_dir, write_json

log = logging.getLogger("persona_lm.checkpoint")


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _trainable(model: torch.nn.Module) -> set[str] | None:
    """Names a checkpoint holds when the model keeps only what it trains (a base's frozen weights are rebuilt
    from the phase's input, not written 4 GB at a time); None = everything."""
    if not getattr(model, "checkpoint_trainable_only", False):
        return None
    return {n for n, p in model.named_parameters() if p.requires_grad}


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without tied duplicates (safetensors refuses shared storage); load re-ties them."""
    sd, seen = {}, set()
    keep = _trainable(model)
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen or (keep is not None and name not in keep):
            continue
        seen.add(t.data_ptr())
        sd[name] = t.detach().contiguous().cpu()
    return sd


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    save_file(state_dict_for_save(model), str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> None:
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    keep = _trainable(model)
    tied = {"lm_head.weight"} if getattr(model.cfg, "tie_embeddings", False) else set()
    missing = [m for m in missing if m not in tied and (keep is None or m in keep)]
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")


def save(ckpt_dir: Path, step: int, model: torch.nn.Module, state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then prune all but the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_dir))
    try:
        save_weights(model, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        config = model.cfg.to_dict() if hasattr(model, "cfg") else None
        meta = {**meta, "step": step, "config": config, "git_sha": git_sha(),
                "sha256": {n: _sha256(tmp / n) for n in ("model.safetensors", "state.pt")}}
        write_json(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> dict | None:
    """The checkpoint's meta if every file is present and matches its hash, else None (with a message)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, digest in meta["sha256"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{name} does not match its recorded sha256")
        return meta
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("skipping checkpoint %s: damaged or incomplete (%s)", path, e)
        return None


def latest(ckpt_dir: Path, params_hash: str, max_step: int | None = None) -> tuple[Path, dict] | None:
    """The newest intact checkpoint written with the same params (at or before `max_step` when given: a run
    told to stop earlier than a previous one never starts past its stop), or None to start fresh."""
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        if max_step is not None and int(path.name.removeprefix("step_")) > max_step:
            continue
        meta = verify(path)
        if meta is None:
            continue
        if meta.get("params_hash") != params_hash:
            log.info("ignoring checkpoint %s: written with different params", path)
            continue
        return path, meta
    return None


def load_state(path: Path) -> dict:
    return torch.load(path / "state.pt", weights_only=True)


def clear(ckpt_dir: Path) -> None:
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def save_model_dir(out: Path, model: torch.nn.Module, tokenizer: Path, extra: dict) -> None:
    """A self-contained model folder, swapped in atomically. Ours: model.safetensors, config.json ({"model":
    architecture, **extra}) and the tokenizer; a base model's: see persona_lm.base. `tokenizer` is a tokenizer
    folder or our tokenizer.json."""
    from persona_lm.base import BaseLM, save_folder
    from persona_lm.tokenizer import copy_tokenizer

    with atomic_dir(out) as tmp:
        if tokenizer.is_dir():
            copy_tokenizer(tokenizer, tmp)
        else:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        if isinstance(model, BaseLM):
            save_folder(model, tmp, extra)
        else:
            save_weights(model, tmp / "model.safetensors")
            write_json(tmp / "config.json", {"model": model.cfg.to_dict(), **extra})


def load_model(path: Path, device: str = "cpu", *, merge: bool = True, trainable: bool = False):
    """(model, tokenizer, config dict) from any model folder: ours, or a base model's (the base, its fine-tuned
    weights and adapter). `merge` folds an adapter into the weights (inference); `trainable` keeps it trainable.
    The model is in eval mode. Raises PersonaError when the folder is not a model folder."""
    from persona_lm.errors import PersonaError
    from persona_lm.model import GPT, GPTConfig
    from persona_lm.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise PersonaError(f"{path}: no such model folder; run `dvc repro` first or point --model at a model folder")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise PersonaError(f"{path}: no {name} here; run `dvc repro` first or point --model at a model folder")
    config = json.loads((path / "config.json").read_text())
    tok = load_tokenizer(path)
    if config.get("kind") == "base":
        from persona_lm.base import load_folder

        model = load_folder(path, config, tok, device, trainable=trainable)
        if merge:
            model.merge()
        return model.eval(), tok, config
    if not (path / "model.safetensors").is_file():
        raise PersonaError(f"{path}: no model.safetensors here; run `dvc repro` first")
    model = GPT(GPTConfig.from_dict(config["model"]))
    load_weights(model, path / "model.safetensors")
    model.to(device).eval()
    return model, tok, config
