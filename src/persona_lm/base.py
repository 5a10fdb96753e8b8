"""A pretrained Hugging Face causal LM as the starting point of a run, behind the interface of our own model.

`resolve` finds the base (a local folder, or a Hub repo fetched into the Hugging Face cache) and checks it before
any weights are fetched: a causal LM that transformers knows, with safetensors weights, no larger than
`base.max_params` (counted exactly, on a weightless "meta" copy built from config.json). Hub errors become one
line naming the key (`base.model`, `base.revision`). Once cached, HF_HUB_OFFLINE=1 runs need no network.

`BaseLM` wraps the loaded model so that the training loop, generate(), chat, the server, evaluation and export
use it as they use ours: `hidden()`, `lm_head`, `emotion_head`, `forward()`, `new_cache()`, `cfg.block_size`.
The emotion head reads the base's final (normalised) hidden state, by the same position rule as ours.

A base-model folder (models/pretrain, finetune, final) holds no copy of the base: `config.json` records it
(repo id or path, revision, commit sha), next to the tokenizer, the emotion head, and what the run changed:
a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) and/or, after full fine-tuning, all weights
(`model.safetensors`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from persona_lm.errors import PersonaError

log = logging.getLogger("persona_lm.base")
# peft reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps: nothing a user can act on
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]
HINT = " (check base.model, or set HF_HUB_OFFLINE=1 to use what is cached)"


# -------------------------------------------------------------------------------------------- finding it

def _hub_error(err: Exception, repo: str, revision: str) -> PersonaError:
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return PersonaError(f"base.model: {repo} is gated: accept its licence on the Hub, then set HF_TOKEN")
    if isinstance(err, errors.RepositoryNotFoundError):
        return PersonaError(f"base.model: no model repository {repo} on the Hub (a private one needs HF_TOKEN; "
                            "a local folder must exist)")
    if isinstance(err, errors.RevisionNotFoundError):
        return PersonaError(f"base.revision: {revision!r} is not a branch, tag or commit of {repo}")
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return PersonaError(f"base.model: {repo} at {revision!r} is not in the Hugging Face cache and the Hub "
                            "is not used (HF_HUB_OFFLINE=1): run once online to download it")
    lines = str(err).strip().splitlines()
    return PersonaError(f"base.model: {repo}: {lines[0] if lines else type(err).__name__}{HINT}")


def _snapshot(repo: str, revision: str, endpoint: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, endpoint=endpoint))
    except Exception as e:  # anything the Hub client raises becomes one line naming the key
        raise _hub_error(e, repo, revision) from None


def resolve(bp) -> tuple[Path, dict]:
    """(folder holding config + tokenizer files, record) for params `base`; downloads no weights.

    The record pins what the run uses: {"model", "revision", "sha", "source"}; `sha` is the Hub commit, or for a
    local folder the sha256 of its config and weight files. Raises PersonaError: unknown repo or revision, no
    safetensors weights, no connection, not cached when offline."""
    local = Path(bp.model).expanduser()
    if local.is_dir():
        if not any(local.glob("*.safetensors")):
            raise PersonaError(f"base.model: {local} holds no .safetensors weights")
        h = hashlib.sha256()
        for f in sorted(local.glob("*.safetensors")) + [local / "config.json"]:
            if f.is_file():
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 24), b""):
                        h.update(chunk)
        return local, {"model": str(local.resolve()), "revision": None, "sha": h.hexdigest(), "source": "local"}
    from huggingface_hub import HfApi, constants

    if not constants.is_offline_mode():
        try:  # one plain request first: an unknown repo or revision fails here, before any download
            info = HfApi(endpoint=bp.endpoint).model_info(bp.model, revision=bp.revision)
        except Exception as e:
            raise _hub_error(e, bp.model, bp.revision) from None
        if not any(s.rfilename.endswith(".safetensors") for s in info.siblings or []):
            raise PersonaError(f"base.model: {bp.model} has no .safetensors weights (persona-lm does not load "
                               "pickle-based .bin files)")
    # by the revision's name, so that the cache remembers what it points to for later offline runs
    folder = _snapshot(bp.model, bp.revision, bp.endpoint, CONFIG_FILES + TOKENIZER_FILES)
    return folder, {"model": bp.model, "revision": bp.revision, "sha": folder.name, "source": "hub",
                    "endpoint": bp.endpoint}


def config_folder(record: dict) -> Path:
    """The folder with the base's config and tokenizer files (from the cache once `resolve` has run)."""
    if record["source"] == "local":
        return Path(record["model"])
    return _snapshot(record["model"], record["sha"], record.get("endpoint"), CONFIG_FILES + TOKENIZER_FILES)


def weights_folder(record: dict) -> Path:
    """The folder with the base's weights, downloaded into the Hugging Face cache on first use."""
    if record["source"] == "local":
        return Path(record["model"])
    return _snapshot(record["model"], record["sha"], record.get("endpoint"), CONFIG_FILES + TOKENIZER_FILES + WEIGHT_FILES)


def skeleton(folder: Path, name: str):
    """The base built on the meta device from its config.json: every module and parameter, no memory, no
    weights. Raises PersonaError when it is not a causal language model transformers can build."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise PersonaError(f"base.model: {name} has no usable config.json: {str(e).splitlines()[0]}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    if not any(a in causal for a in archs):
        raise PersonaError(f"base.model: {name} is not a causal language model (architectures: "
                           f"{', '.join(archs) or 'none'}); choose one made for text generation")
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config.get_text_config(), attr, None) not in (None, 1.0):
            raise PersonaError(f"base.model: {name} transforms its logits ({attr}), which persona-lm's "
                               "generation does not do; choose another base")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check(folder: Path, bp) -> int:
    """Check the base before its weights are fetched; returns its parameter count. Raises PersonaError."""
    n = sum(p.numel() for p in skeleton(folder, bp.model).parameters())
    if n > bp.max_params:
        raise PersonaError(f"base.max_params: {bp.model} has {n:,} parameters, more than base.max_params "
                           f"({bp.max_params:,}); raise the limit if you mean it")
    return n


# ----------------------------------------------------------------------------------------------- the model

@dataclass
class BaseConfig:
    """What the rest of the project reads from `model.cfg`."""
    vocab_size: int
    block_size: int
    n_embd: int
    n_layer: int

    def to_dict(self) -> dict:
        return asdict(self)


class HFCache:
    """generate()'s KV-cache interface over transformers' DynamicCache."""

    def __init__(self, config):
        self.config = config
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.kv, self.length = DynamicCache(config=self.config), 0

    def advance(self, T: int) -> None:
        self.length += T

    def crop(self, n: int) -> None:
        self.kv.crop(n)
        self.length = min(n, self.length)


class BaseLM(nn.Module):
    """A transformers causal LM (`lm`, or a peft model around it while adapters are attached) and our emotion head.

    `weights`: the file of fully fine-tuned weights this model was loaded with (None = the base's own);
    `trained_full`: this process trains all weights (set by lora.apply), so saving writes them.
    """

    # checkpoints hold only what a phase trains: the frozen base is rebuilt from the phase's input folder
    checkpoint_trainable_only = True

    def __init__(self, lm: nn.Module, record: dict, n_emotions: int, block_size: int):
        super().__init__()
        self.lm, self.record = lm, record
        text = self.hf.config.get_text_config()
        width = text.hidden_size
        limit = getattr(text, "max_position_embeddings", None) or block_size
        self.cfg = BaseConfig(vocab_size=text.vocab_size, block_size=min(block_size, limit),
                              n_embd=width, n_layer=text.num_hidden_layers)
        self.emotion_head = nn.Linear(width, n_emotions) if n_emotions else None
        if self.emotion_head is not None:  # zeros: deterministic without a seed, and a fine start for a linear probe
            nn.init.zeros_(self.emotion_head.weight)
            nn.init.zeros_(self.emotion_head.bias)
        self.weights: Path | None = None
        self.trained_full = False
        self.marker_ids: list[int] = []  # control tokens whose embedding rows are trained too

    @property
    def hf(self) -> nn.Module:
        """The transformers model itself (peft injects its adapter layers into it in place)."""
        adapter = self.adapter
        return adapter.get_base_model() if adapter is not None else self.lm

    @property
    def adapter(self):
        """The peft model when adapters are attached, else None."""
        from peft import PeftModel

        return self.lm if isinstance(self.lm, PeftModel) else None

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def grad_checkpointing(self) -> bool:
        return self.hf.is_activation_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        if on:
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif self.grad_checkpointing:
            self.hf.activation_checkpointing_disable()

    def new_cache(self, batch_size: int = 1, device=None, dtype=None) -> HFCache:
        return HFCache(self.hf.config)

    def hidden(self, idx: torch.Tensor, persona: torch.Tensor | None = None, cache: HFCache | None = None,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, n_embd) for token ids (B, T); `cache` enables decoding; `pad`
        (B,) counts each row's left padding, as in GPT.hidden (transformers' attention mask + position ids)."""
        if persona is not None and bool(persona.any()):
            raise ValueError("a base-model run holds one persona: persona index must be 0")
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)
        attention = None
        if pad is not None:
            positions = (positions - pad[:, None]).clamp(min=0)
            attention = (torch.arange(start + T, device=idx.device) >= pad[:, None]).long()
        out = self.hf.base_model(input_ids=idx, position_ids=positions, attention_mask=attention,
                                 use_cache=cache is not None, past_key_values=cache.kv if cache is not None else None)
        if cache is not None:
            cache.kv = out.past_key_values
            cache.advance(T)
        return out.last_hidden_state

    def forward(self, idx, persona=None, cache=None, emotion_index=None):
        """(next-token logits (B, T, vocab), emotion logits (B, n_emotions) at `emotion_index` or None), as GPT."""
        h = self.hidden(idx, persona, cache)
        logits = self.lm_head(h)
        if emotion_index is None:
            return logits, None
        if self.emotion_head is None:
            raise ValueError("this model has no emotion head")
        return logits, self.emotion_head(h[torch.arange(h.shape[0], device=h.device), emotion_index])

    def param_counts(self) -> dict[str, int]:
        groups = {"base": 0, "adapter": 0, "emotion_head": 0}
        for name, p in self.named_parameters():
            if name.startswith("emotion_head"):
                groups["emotion_head"] += p.numel()
            elif "lora_" in name or "trainable_tokens" in name:
                groups["adapter"] += p.numel()
            else:
                groups["base"] += p.numel()
        groups["total"] = sum(groups.values())
        return groups

    def merge(self) -> None:
        """Fold the adapter into the weights (faster inference; the logits change only by rounding)."""
        if self.adapter is not None:
            self.lm = self.adapter.merge_and_unload()


def load_hf(record: dict, vocab_size: int, device: str = "cpu"):
    """The base's transformers model in fp32, its embeddings grown to `vocab_size` when tokens were added: new
    rows start at the mean of the old ones (Hewitt 2021, "Initializing new word embeddings for pretrained
    language models"), which is deterministic and keeps the new tokens' logits ordinary."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per load on stderr is noise in chat, serve and the stages
    folder = weights_folder(record)
    log.info("loading base %s (%s)", record["model"], record["sha"][:12])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    except Exception as e:
        raise PersonaError(f"base.model: cannot load {record['model']}: {str(e).splitlines()[0]}") from None
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size > old:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        with torch.no_grad():
            for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                emb.weight[old:] = emb.weight[:old].mean(0)
    return model.to(device)


# ------------------------------------------------------------------------------------------------ folders

def save_folder(model: BaseLM, folder: Path, extra: dict) -> None:
    """Write `model` into the (temporary, empty) `folder`: config.json with the base record, the emotion head,
    the adapter in peft's format, and all weights only if they were fine-tuned."""
    from persona_lm.train.checkpoint import state_dict_for_save

    if model.adapter is not None:
        for cfg in model.adapter.peft_config.values():  # name the base as users fetch it, not our cache path
            cfg.base_model_name_or_path = model.record["model"]
            cfg.revision = model.record["sha"] if model.record["source"] == "hub" else None
        model.adapter.save_pretrained(str(folder))
    weights = None
    if model.trained_full:
        save_file(state_dict_for_save(model.hf), str(folder / "model.safetensors"), metadata={"format": "pt"})
        weights = "model.safetensors"
    elif model.weights is not None:
        shutil.copyfile(model.weights, folder / "model.safetensors")
        weights = "model.safetensors"
    if model.emotion_head is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.emotion_head.state_dict().items()},
                  str(folder / "emotion_head.safetensors"))
    config = {"kind": "base", "base": model.record, "weights": weights, "adapter": model.adapter is not None,
              "block_size": model.cfg.block_size, **extra}
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def new(record: dict, tok, n_emotions: int, block_size: int, device: str = "cpu") -> BaseLM:
    """The base as it was published, with a fresh emotion head, for the tokenizer `tok` built for it."""
    model = BaseLM(load_hf(record, tok.vocab_size, device), record, n_emotions, block_size)
    model.marker_ids = list(tok.marker_ids)
    return model.to(device)


def load_folder(path: Path, config: dict, tok, device: str = "cpu", trainable: bool = False) -> BaseLM:
    """A BaseLM from a base-model folder: the base, its fine-tuned weights if any, the adapter if any (trainable
    when `trainable`), the emotion head."""
    from peft import PeftModel

    lm = load_hf(config["base"], tok.vocab_size, device)
    weights = path / config["weights"] if config.get("weights") else None
    if weights is not None:
        missing, unexpected = lm.load_state_dict(load_file(str(weights)), strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")} if lm.config.get_text_config().tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise PersonaError(f"{weights}: weights do not fit {config['base']['model']}")
    if config.get("adapter"):
        lm = PeftModel.from_pretrained(lm, str(path), is_trainable=trainable)
    model = BaseLM(lm, config["base"], len(config.get("emotions") or []), config["block_size"])
    model.weights, model.marker_ids = weights, list(tok.marker_ids)
    head = path / "emotion_head.safetensors"
    if model.emotion_head is not None and head.is_file():
        model.emotion_head.load_state_dict(load_file(str(head)))
    return model.to(device)
