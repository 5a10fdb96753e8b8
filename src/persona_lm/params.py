"""The params.yaml schema: the single source of truth for every knob's name, type, range and default.

Every stage loads its params through `load_params`, so a typo or an out-of-range value fails before
any work starts, with one line naming the key (`params.yaml: filter.min_words: must be >= 0 (got -3)`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persona_lm.errors import ParamsError


class Section(BaseModel):
    """Unknown keys are errors: a misspelt knob must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- persona

class Fact(Section):
    """One thing the persona says about itself. Templates write it as `{key}`; the identity check asks its
    `questions` (paraphrases kept out of the templates) and passes a reply that states it and nothing that
    contradicts it (see persona_lm.probes)."""

    value: str | None = Field(None, min_length=1, description="as the templates say it; the name fact's is persona.name")
    accept: list[str] = Field(default_factory=list, description="other phrases that state it (the value always does)")
    contradicts: list[str] = Field(default_factory=list, description="phrases that state a different answer")
    questions: list[str] = Field(min_length=1, description="held-out questions about it, for the identity check")


def _default_facts() -> dict[str, Fact]:
    return {
        "name": Fact(questions=["May I ask your name?", "Who am I talking to?", "How should I address you?",
                                "Can you tell me your name, please?", "What do people call you?",
                                "Sorry, I forgot your name. What was it?"],
                     contradicts=["Bob", "Alice", "Siri", "Alexa", "ChatGPT", "Clippy"]),
        "kind": Fact(value="desktop companion", accept=["companion", "desktop friend", "desktop pet"],
                     contradicts=["human", "person", "robot with arms", "cat", "dog"],
                     questions=["What kind of being are you?", "So what exactly are you?",
                                "Are you a person or something else?", "What are you, really?"]),
        "home": Fact(value="your screen", accept=["screen", "desktop", "taskbar"],
                     contradicts=["house", "forest", "city", "ocean", "cloud", "phone"],
                     questions=["Where do you stay?", "Where's your home?", "Where do you hang out?",
                                "Where can I find you?"]),
        "favourite_food": Fact(value="strawberries", accept=["strawberry"],
                     contradicts=["pizza", "chocolate", "cookies", "cake", "apples", "sandwich"],
                     questions=["What food do you love most?", "Which snack is your favourite?",
                                "If you could eat one thing, what would it be?", "What's the best food?"]),
        "favourite_colour": Fact(value="yellow", accept=["sunny yellow"],
                       contradicts=["red", "blue", "green", "purple", "pink", "orange", "black"],
                       questions=["Which colour do you like best?", "What's your favorite color?",
                                  "Pick a colour you love."]),
        "fear": Fact(value="the recycle bin", accept=["recycle bin", "trash can", "being deleted"],
                     contradicts=["spiders", "dogs", "the dark", "heights"],
                     questions=["What frightens you?", "What's your biggest fear?", "Is there anything you're scared of?"]),
    }


class Persona(Section):
    name: str = Field("Rosie", min_length=1)
    user_name: str = Field("friend", min_length=1)
    system_prompt: str = Field(
        "You are Rosie, a small, warm desktop companion who lives on the user's screen. "
        "You are curious, playful and kind, and you say how you feel.",
        min_length=1,
    )
    emotions: list[str] = Field(
        default_factory=lambda: [
            "neutral", "joy", "sadness", "anger", "fear", "surprise", "disgust", "love", "curiosity",
        ],
        min_length=2,
    )
    facts: dict[str, Fact] = Field(default_factory=_default_facts)

    @model_validator(mode="after")
    def _facts(self) -> "Persona":
        for key, fact in self.facts.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"facts.{key}: a fact key is a lowercase identifier (templates write it as {{{key}}})")
            if key in ("name", "user") and fact.value is not None:
                raise ValueError(f"facts.{key}.value: set by persona.name / persona.user_name, not here")
            if key not in ("name", "user") and fact.value is None:
                raise ValueError(f"facts.{key}.value: required key is missing")
        return self

    def fact_value(self, key: str) -> str:
        return self.name if key == "name" else self.user_name if key == "user" else self.facts[key].value

    @model_validator(mode="after")
    def _emotions_unique(self) -> "Persona":
        if len(set(self.emotions)) != len(self.emotions):
            raise ValueError("emotions: labels must be unique")
        if "neutral" not in self.emotions:
            raise ValueError("emotions: must include 'neutral' (the label for unlabelled replies)")
        return self


# ----------------------------------------------------------------------------------------------- corpus

class LocalSource(Section):
    kind: Literal["local"]
    path: str = Field(min_length=1)
    text_column: str = "text"
    max_docs: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)


class HttpSource(Section):
    kind: Literal["http"]
    url: str = Field(pattern=r"^https?://")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_column: str = "text"
    max_docs: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)


class HfSource(Section):
    kind: Literal["hf"]
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    pattern: str = Field("**/*.parquet", min_length=1)
    text_column: str = "text"
    revision: str = "main"
    endpoint: str | None = Field(None, pattern=r"^https?://")
    max_docs: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)


Source = Annotated[Union[LocalSource, HttpSource, HfSource], Field(discriminator="kind")]


class Corpus(Section):
    sources: list[Source] = Field(
        default_factory=lambda: [LocalSource(kind="local", path="data/sample/corpus")], min_length=1
    )


# ----------------------------------------------------------------------------------------------- filter

class GopherQuality(Section):
    """Rae et al. 2021 (Gopher/MassiveText) quality rules; defaults are the published thresholds."""

    enabled: bool = True
    min_doc_words: int = Field(50, ge=0)
    max_doc_words: int = Field(100_000, ge=1)
    min_avg_word_length: float = Field(3.0, ge=0)
    max_avg_word_length: float = Field(10.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    max_non_alpha_words_ratio: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0)
    words: Literal["whitespace", "datatrove"] = Field(
        "whitespace", description="what the rules count as words: whitespace-separated (the paper) or "
                                  "datatrove's spaCy-style tokens, where punctuation marks are tokens too")


class GopherRepetition(Section):
    """Gopher repetition rules; `top_n_grams` and `dup_n_grams` map n to the max character fraction."""

    enabled: bool = True
    dup_line_frac: float = Field(0.3, ge=0, le=1)
    dup_para_frac: float = Field(0.3, ge=0, le=1)
    dup_line_char_frac: float = Field(0.2, ge=0, le=1)
    dup_para_char_frac: float = Field(0.2, ge=0, le=1)
    top_n_grams: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    @model_validator(mode="after")
    def _n_grams(self) -> "GopherRepetition":
        for name in ("top_n_grams", "dup_n_grams"):
            for n, frac in getattr(self, name).items():
                if n < 1 or not 0 <= frac <= 1:
                    raise ValueError(f"{name}: needs n >= 1 and a fraction in [0, 1] (got {n}: {frac})")
        return self


class C4Quality(Section):
    """Raffel et al. 2020 (C4) rules; line-level rules remove lines, doc-level rules drop the doc."""

    enabled: bool = True
    min_words_per_line: int = Field(3, ge=0)
    min_num_sentences: int = Field(5, ge=0)
    max_word_length: int = Field(1000, ge=1)
    require_terminal_punct: bool = True
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQuality(Section):
    """Penedo et al. 2024 (FineWeb) quality rules with the published thresholds."""

    enabled: bool = True
    line_punct_thr: float = Field(0.12, ge=0, le=1)
    line_punct_exclude_zero: bool = False
    short_line_thr: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=1)
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1)
    new_line_ratio: float = Field(0.3, ge=0)


class MinHash(Section):
    enabled: bool = True
    ngram: int = Field(5, ge=1)
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)


class Filter(Section):
    normalize_unicode: bool = True
    min_words: int = Field(30, ge=0)
    max_words: int = Field(200_000, ge=1)
    gopher_quality: GopherQuality = GopherQuality()
    gopher_repetition: GopherRepetition = GopherRepetition()
    c4: C4Quality = C4Quality()
    fineweb: FineWebQuality = FineWebQuality()
    exact_dedup: bool = True
    minhash: MinHash = MinHash()
    val_fraction: float = Field(0.05, ge=0, lt=1)
    shard_mb: float = Field(16, gt=0, description="MB of raw text per shard: filter_corpus holds one shard's "
                            "documents in memory (~30x their size at peak), whatever the corpus size; the "
                            "output does not depend on it")
    engine: Literal["local", "dask"] = Field("local", description="where each shard is scanned: in the stage's "
                                             "process, or on a Dask cluster (persona_lm.data.engine); the output "
                                             "is byte-identical either way")
    scheduler: str | None = Field(None, description="a running Dask "
                                  "scheduler's address (tcp://host:port); none: engine dask starts `workers` "
                                  "worker processes on 127.0.0.1")
    workers: int = Field(2, ge=1, description="worker processes of the local Dask cluster")

    @model_validator(mode="after")
    def _bounds(self) -> "Filter":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words: must be <= max_words ({self.max_words}) (got {self.min_words})")
        if self.scheduler is not None and not re.fullmatch(r"[a-z]+://\S+:\d+", self.scheduler):
            raise ValueError(f"scheduler: must be an address like tcp://host:port (got {self.scheduler!r})")
        if self.scheduler is not None and self.engine != "dask":
            raise ValueError(f"scheduler: is only used with engine: dask (got engine: {self.engine})")
        return self

    def output_params(self) -> str:
        """These params as JSON without those that only choose where the work runs (the output is the same)."""
        return self.model_dump_json(exclude={"engine", "scheduler", "workers"})


# ---------------------------------------------------------------------------------------------- youtube

class Segment(Section):
    """How a transcript is cut into utterances and then into conversations."""

    pause_s: float = Field(1.2, ge=0)
    max_utterance_words: int = Field(60, ge=1)
    turns_per_conversation: int = Field(6, ge=2)
    min_reply_words: int = Field(4, ge=1)


class Youtube(Section):
    urls: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    prefer_manual: bool = True
    max_videos: int | None = Field(None, ge=1)
    local_dirs: list[str] = Field(default_factory=lambda: ["data/sample/youtube"])
    segment: Segment = Segment()


# ---------------------------------------------------------------------------------- templates, messages

class Templates(Section):
    dir: str = "data/templates"
    conversations: int = Field(3000, ge=1)
    max_turns: int = Field(4, ge=1)


def _phone_region(code: str | None) -> str | None:
    """An ISO 3166-1 alpha-2 code that phonenumbers has numbering-plan metadata for, upper-cased."""
    import phonenumbers

    if code is not None and code.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{code!r} is not a region code phonenumbers knows (ISO 3166-1 alpha-2, e.g. ES, GB, US)")
    return code.upper() if code else code


class Export(Section):
    path: str = Field(min_length=1)
    format: Literal["auto", "whatsapp", "telegram", "signal", "instagram"] = "auto"
    me: str = Field(min_length=1, description="your own display name in the export: your side is the gpt voice")
    region: str | None = Field(None, description="where this chat's phone numbers are written without a country "
                                                   "code; overrides messages.region")
    _region = field_validator("region")(_phone_region)


class Messages(Section):
    exports: list[Export] = Field(
        default_factory=lambda: [Export(path="data/sample/messages/whatsapp_chat.txt", me="Sam")]
    )
    gap_minutes: float = Field(240.0, gt=0)
    scrub_pii: bool = True
    min_turns: int = Field(2, ge=2)
    region: str | None = Field(None, description="region of national phone numbers in every export; null = "
                                                  "guessed per export from its language (see persona_lm.data.pii)")
    _region = field_validator("region")(_phone_region)


# ---------------------------------------------------------------------------------------------- sharegpt

class Sharegpt(Section):
    extra: list[str] = Field(default_factory=list)
    weights: dict[Literal["templates", "transcripts", "messages", "extra", "emotion"], float] = Field(
        default_factory=lambda: {"templates": 1.0, "transcripts": 1.0, "messages": 1.0, "extra": 1.0, "emotion": 1.0}
    )
    shares: dict[Literal["templates", "transcripts", "messages", "extra", "emotion"], float] = Field(
        default_factory=lambda: {"extra": 0.1, "emotion": 0.1},
        description="fraction of the finetune phase's tokens a source gets; unlisted sources share the rest "
                    "in proportion to their tokens")
    persona_floor: float = Field(0.5, ge=0, le=1, description="warn when templates + transcripts + messages "
                                                              "get less than this share of finetune tokens")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_value_chars: int = Field(8000, ge=1)

    @model_validator(mode="after")
    def _weights(self) -> "Sharegpt":
        for k, w in self.weights.items():
            if w < 0:
                raise ValueError(f"weights.{k}: must be >= 0 (got {w})")
        for k, w in self.shares.items():
            if not 0 <= w <= 1:
                raise ValueError(f"shares.{k}: must be between 0 and 1 (got {w})")
        if sum(self.shares.values()) > 1 + 1e-9:
            raise ValueError(f"shares: must add up to at most 1 (got {sum(self.shares.values()):g})")
        return self


class EmotionDataset(Section):
    kind: Literal["goemotions", "dailydialog"]
    path: str = Field(min_length=1, description="a GoEmotions .tsv, or a DailyDialog dialogues_*.txt(.gz)")
    max_rows: int | None = Field(None, ge=1)


# --------------------------------------------------------------------------------------- tokenizer, model

class TokenizerParams(Section):
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = Field(2048, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)


class MemoryAttention(Section):
    """Memory attention (Compressive Transformer, Rae et al. 2019; see persona_lm.model): the keys and values of
    turns that leave the context window are mean-pooled into memory slots that the chosen layers attend to.
    Phase 3 then also trains on long dialogues that need it (user facts asked after they left the window)."""

    enabled: bool = False
    layers: list[int] | None = Field(None, min_length=1, description="layers that attend to memory; null = all")
    compression: int = Field(4, ge=1, description="consecutive tokens mean-pooled into one memory slot")
    slots: int = Field(128, ge=1, description="memory slots per layer; the oldest are dropped first")
    share: float = Field(0.5, gt=0, le=1, description="phase 3: share of the training batches that are long dialogues")
    batch_size: int = Field(8, ge=1, description="phase 3: long dialogues per batch (each is several windows)")
    dialogues: int = Field(2000, ge=1, description="phase 3: long dialogues built from ShareGPT train rows and user facts")
    episodes: int = Field(1, ge=1, description="per long dialogue: facts told, unrelated turns past the window, "
                          "then questions about them")
    facts: int = Field(3, ge=1, le=21, description="facts told per episode (distinct within a dialogue)")


class Model(Section):
    """Architecture. GPT-2 family: learned + layernorm + gelu; Llama family: rope + rmsnorm + swiglu."""

    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1, description="null = n_head; fewer = grouped-query attention")
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(256, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool = False
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    attention: Literal["standard", "differential"] = Field(
        "standard", description="differential: each head attends with the difference of two softmax maps (Ye et "
        "al. 2024, 'Differential Transformer'); not with memory attention")
    mlp: Literal["gelu", "swiglu", "moe"] = Field("gelu", description="moe: top_k of n_experts SwiGLU experts per "
                                                  "token (Mixtral-style, dropless)")
    mlp_hidden: int = Field(0, ge=0, description="0 = 4*n_embd for gelu, ~8/3*n_embd for swiglu and each moe expert")
    n_experts: int = Field(8, ge=1, description="mlp: moe: experts per block")
    top_k: int = Field(2, ge=1, description="mlp: moe: experts each token is routed to, 1..n_experts")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="mlp: moe: weight of the routers' load-balancing "
                                        "loss in training (Switch Transformer's alpha)")
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = True
    n_personas: int = Field(1, ge=1)
    memory: MemoryAttention = MemoryAttention()

    @model_validator(mode="after")
    def _shapes(self) -> "Model":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd: must be divisible by n_head ({self.n_head}) (got {self.n_embd})")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: must divide n_head ({self.n_head}) (got {self.n_kv_head})")
        head = self.n_embd // self.n_head
        if self.pos == "rope" and head % 2:
            raise ValueError(f"pos: rope needs an even head size, n_embd/n_head = {head}")
        if self.attention == "differential":
            if head % 2 or (self.pos == "rope" and head % 4):
                need = "divisible by 4 (rope rotates each half)" if self.pos == "rope" else "even"
                raise ValueError(f"attention: differential splits each head's query and key in two halves: "
                                 f"n_embd/n_head must be {need} (got {head})")
            if self.memory.enabled:
                raise ValueError("attention: differential does not combine with memory attention "
                                 "(model.memory.enabled: true); set model.attention: standard or "
                                 "model.memory.enabled: false")
        if self.mlp == "moe" and self.top_k > self.n_experts:
            raise ValueError(f"top_k: must be in 1..n_experts ({self.n_experts}) (got {self.top_k})")
        bad = [i for i in self.memory.layers or [] if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"memory.layers: layers are 0..{self.n_layer - 1} (n_layer {self.n_layer}) (got {bad})")
        return self


class Base(Section):
    """A pretrained Hugging Face causal LM to start from instead of a randomly initialised model."""

    model: str | None = Field(None, min_length=1, description="null = train from scratch; a Hub repo id or a "
                              "local folder holding a transformers causal LM (config.json, safetensors, tokenizer)")
    revision: str = Field("main", min_length=1, description="branch, tag or commit of a Hub repo")
    endpoint: str | None = Field(None, pattern=r"^https?://", description="a Hub mirror; null = HF_ENDPOINT or "
                                 "huggingface.co")
    max_params: int = Field(1_500_000_000, ge=1, description="refuse larger bases before downloading their weights")
    markers: Literal["text", "tokens"] = Field("text", description="emotion and action markers as plain text "
                                               "(`[joy]`, `*waves*`) or as added special tokens whose embedding "
                                               "rows are trained")

    @model_validator(mode="after")
    def _repo_or_folder(self) -> "Base":
        m = self.model
        if m is not None and not Path(m).expanduser().is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", m):
            raise ValueError(f"model: neither a local folder nor a Hub repo id like org/name (got {m!r})")
        return self


class Lora(Section):
    """LoRA (Hu et al. 2021) through peft: train low-rank adapters instead of all weights."""

    r: int = Field(0, ge=0, description="rank; 0 = full fine-tuning")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input; 0 skips it (8% faster "
                           "and ~400 MB less on a 30M base, bench/lora.py)")
    target_modules: list[str] | None = Field(None, min_length=1, description="module names to adapt; null = the "
                                             "attention and MLP projections of the architecture")
    phases: list[Literal["pretrain", "finetune", "emotion"]] = Field(
        default_factory=lambda: ["pretrain", "finetune", "emotion"],
        description="the phases that train adapters (a phase not listed trains all weights); pretraining from "
                    "scratch always trains all weights: adapters need pretrained weights to adapt")


class Phase(Section):
    """Optimisation settings shared by the three training phases."""

    max_iters: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(20, ge=0)
    cooldown: float = Field(0.3, gt=0, le=1, description="share of the post-warmup steps that decay lr to min_lr; "
                            "lr holds before them (1 = decay throughout, nanoGPT's schedule)")
    decay: Literal["linear", "cosine"] = "linear"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon (Jordan et al. 2024) for the 2-D weight matrices inside the transformer "
        "blocks, AdamW for everything else (embeddings, heads, norms, biases), as modded-nanogpt trains")
    muon_lr: float | None = Field(None, gt=0, description="peak lr of the Muon matrices, on the same schedule as lr "
                                  "(scaled by lr_at / lr); null = lr, which match_rms_adamw makes fit (4-12x lr "
                                  "trained faster on shakespeare-char, bench/speedrun.py)")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's momentum (an EMA of the gradients)")
    muon_nesterov: bool = Field(True, description="orthogonalise the Nesterov look-ahead instead of the momentum")
    muon_ns_steps: int = Field(5, ge=1, lt=100, description="Newton-Schulz iterations that orthogonalise the update")
    muon_adjust_lr: Literal["match_rms_adamw", "original"] = Field(
        "match_rms_adamw", description="per-matrix lr scale: match_rms_adamw = 0.2 * sqrt(max(rows, cols)), an update "
        "of AdamW's RMS so AdamW's lr and weight decay carry over (Liu et al. 2025, 'Muon is Scalable for LLM "
        "Training'); original = sqrt(max(1, rows / cols)) (Jordan et al. 2024; lr ~0.02 there)")
    muon_weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay of the Muon matrices, "
                                            "per step lr * this; null = weight_decay")
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")
    eval_interval: int = Field(100, ge=1)
    eval_iters: int = Field(10, ge=1)
    ckpt_interval: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    stop_at: int | None = Field(None, ge=1, description="stop after this many steps with the lr schedule still "
                                "planned over max_iters: a budgeted run that a later run with a higher stop_at "
                                "continues from its checkpoint (persona-lm tournament); null = max_iters")

    @model_validator(mode="after")
    def _lrs(self) -> "Phase":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: must be <= lr ({self.lr}) (got {self.min_lr})")
        if self.stop_at is not None and self.stop_at > self.max_iters:
            raise ValueError(f"stop_at: must be <= max_iters ({self.max_iters}) (got {self.stop_at})")
        return self

    @property
    def end_step(self) -> int:
        """The step this run stops at: stop_at, else max_iters."""
        return self.max_iters if self.stop_at is None else self.stop_at


class Pretrain(Phase):
    max_iters: int = Field(200, ge=0, description="0 = no pretraining (a base model is used as it is)")
    personal_mix: float = Field(0.05, ge=0, le=1, description="share of sequences drawn from personal voice text")


class Finetune(Phase):
    """Fine-tuning decays lr from the start (cosine): on the default data, holding it as pretraining does fits the
    chat loss better (2.43 against 2.74) but the model then forgets its name in half the persona checks."""

    max_iters: int = Field(700, ge=1)
    cooldown: float = Field(1.0, gt=0, le=1)
    decay: Literal["linear", "cosine"] = "cosine"
    replay: float = Field(0.1, ge=0, le=1, description="share of batches that replay corpus text")


class Emotion(Phase):
    """Emotion-labelled data sources, and phase 3 (the emotion head) settings."""

    datasets: list[EmotionDataset] = Field(default_factory=list)
    lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(5e-5, ge=0)
    warmup_iters: int = Field(10, ge=0)
    cooldown: float = Field(1.0, gt=0, le=1)
    decay: Literal["linear", "cosine"] = "cosine"
    eval_interval: int = Field(50, ge=1)
    ckpt_interval: int = Field(50, ge=1)
    lm_weight: float = Field(0.5, ge=0, description="weight of the LM loss next to the emotion loss")
    freeze_backbone: bool = False
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="emotion cross-entropy weights: balanced = n / (k * count) per label over the train "
        "split's labelled replies (sklearn's compute_class_weight), so rare moods count as much as neutral")


class EmotionBenchmark(EmotionDataset):
    """A public emotion data set the evaluate stage scores the emotion head on, next to two baselines."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="report name; null = kind + the "
                             "file's split name (goemotions_dev, dailydialog_validation)")
    drop_overlap: bool = Field(False, description="drop rows whose text is also in the training data instead of "
                               "refusing the benchmark")

    @property
    def report_name(self) -> str:
        """`name`, else kind + split: .../goemotions/dev.tsv -> goemotions_dev, dialogues_validation.txt ->
        dailydialog_validation."""
        if self.name:
            return self.name
        stem = Path(self.path).name.removesuffix(".gz").rsplit(".", 1)[0]
        return f"{self.kind}_{stem.removeprefix('dialogues_').removeprefix('dialogues') or 'text'}"


class EmotionFit(Section):
    prompt: str = Field(min_length=1)
    fits: list[str] = Field(min_length=1, description="emotion labels that fit a reply to the prompt")


def _default_emotion_fit() -> list[EmotionFit]:
    cases = {
        ("sadness", "love"): ["My dog died this morning.", "I failed my exam and I feel awful.",
                              "Nobody came to my birthday party."],
        ("joy", "surprise"): ["Why did the scarecrow win an award? Because he was outstanding in his field!",
                              "Knock knock! Who's there? Lettuce. Lettuce in, it's cold out here!",
                              "What do you call a fish with no eyes? A fsh!"],
        ("surprise", "joy", "anger"): ["*pokes you*", "*pokes you again, harder*", "*boops your nose*"],
        ("joy", "love"): ["You're the best companion anyone could have.", "I love talking to you, you always "
                          "cheer me up.", "You look really cute today!"],
        ("fear", "anger", "sadness"): ["I'm going to delete you right now.", "I'll drag you into the recycle "
                                       "bin and empty it.", "Be quiet or I'll uninstall you!"],
    }
    return [EmotionFit(prompt=prompt, fits=list(fits)) for fits, prompts in cases.items() for prompt in prompts]


class Eval(Section):
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, ge=0, description="for samples; the probes decode greedily")
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, ge=1)
    corpus_max_tokens: int = Field(100_000, ge=1, description="cap on corpus val tokens for bits per byte")
    prompts: list[str] = Field(default_factory=lambda: [
        "Hi! Who are you?", "How are you feeling today?", "*pokes you*", "Can you help me plan my afternoon?",
        "I had a really bad day.", "Tell me a joke!", "*drags you to the corner of the screen*", "Good night!",
    ], min_length=1)
    emotion_fit: list[EmotionFit] = Field(default_factory=_default_emotion_fit)
    memory_gaps: list[int] = Field(default_factory=lambda: [1, 3, 6], min_length=1,
                                   description="turns between a user's fact and the question about it")
    recall_facts: int = Field(5, ge=1, le=21, description="facts told, then pushed beyond the window and asked "
                                                           "back (the memory benchmark's beyond_window scenario)")
    repeat_ngram: int = Field(4, ge=2, description="a reply repeating a word n-gram of this size counts as repetitive")
    emotion_benchmarks: list[EmotionBenchmark] = Field(default_factory=list, description="public emotion data the "
                                                       "head is scored on next to two baselines (persona_lm.emotion_bench)")

    @model_validator(mode="after")
    def _benchmark_names(self) -> "Eval":
        names = [b.report_name for b in self.emotion_benchmarks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"emotion_benchmarks[{i}].name: {name!r} is used twice (set name: to tell them apart)")
        return self


class WeightMemory(Section):
    """Weight memory (persona_lm.memory): a fact the user tells is trained into a per-user LoRA adapter, with an
    EWC penalty (Kirkpatrick et al. 2017) and/or replayed finetune rows keeping what the model already knows."""

    r: int = Field(8, ge=1, description="rank of the memory adapter")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(None, min_length=1, description="module names to adapt; null = the "
                                             "attention and MLP projections (a base: every linear layer but the head)")
    steps: int = Field(200, ge=1, description="optimizer steps per memory write")
    batch_size: int = Field(10, ge=1, description="conversations per step, facts and replayed rows together")
    lr: float = Field(4e-3, gt=0)
    ewc_lambda: float = Field(30.0, ge=0, description="weight of the EWC penalty; 1 = the penalty estimates the "
                              "rise of the finetune loss in nats per token; 0 = off")
    replay_share: float = Field(0.2, ge=0, lt=1, description="share of each batch drawn from ShareGPT train rows")
    anchors: int = Field(30, ge=0, description="questions about what the user did not tell (and a few about the "
                         "companion itself, mirroring the facts) answered by the model before it learns, trained "
                         "alongside the facts so that only what was told changes; 0 = none")
    fisher_examples: int = Field(128, ge=0, description="ShareGPT train conversations train_emotion estimates the "
                                 "diagonal Fisher on (fisher.safetensors beside the weights); 0 = none written")


# ------------------------------------------------------------------------------------------------- root

class Params(Section):
    seed: int = Field(1337, ge=0)
    persona: Persona = Persona()
    corpus: Corpus = Corpus()
    filter: Filter = Filter()
    youtube: Youtube = Youtube()
    templates: Templates = Templates()
    messages: Messages = Messages()
    sharegpt: Sharegpt = Sharegpt()
    emotion: Emotion = Emotion()
    tokenizer: TokenizerParams = TokenizerParams()
    model: Model = Model()
    base: Base = Base()
    lora: Lora = Lora()
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    eval: Eval = Eval()
    weight_memory: WeightMemory = WeightMemory()

    @model_validator(mode="after")
    def _fit_labels(self) -> "Params":
        if "emotion_fit" not in self.eval.model_fields_set:
            return self  # the defaults name every default label; evaluate keeps those of persona.emotions
        for i, case in enumerate(self.eval.emotion_fit):
            unknown = [e for e in case.fits if e not in self.persona.emotions]
            if unknown:
                raise ValueError(f"eval.emotion_fit[{i}].fits: {unknown} not in persona.emotions")
        return self

    @model_validator(mode="after")
    def _base_personas(self) -> "Params":
        if self.base.model is not None and self.model.n_personas != 1:
            raise ValueError(f"model.n_personas: a base-model run holds one persona (got {self.model.n_personas})")
        return self

    @model_validator(mode="after")
    def _muon_trains_own_blocks(self) -> "Params":
        """Muon trains our own model's block matrices. A base model's layers are not ours, and LoRA's factors
        are not hidden matrices whose update should be orthogonal (only their product is a layer's update), so
        both are refused rather than quietly trained by AdamW alone."""
        for name in ("pretrain", "finetune", "emotion"):
            if getattr(self, name).optimizer != "muon":
                continue
            if self.base.model is not None:
                raise ValueError(f"{name}.optimizer: muon trains our own model's block matrices, not base.model "
                                 f"{self.base.model} (set {name}.optimizer: adamw or base.model: null)")
            if self.lora.r > 0 and name in self.lora.phases and name != "pretrain":
                raise ValueError(f"{name}.optimizer: muon does not train LoRA adapters (lora.r is {self.lora.r} and "
                                 f"lora.phases lists {name}): set {name}.optimizer: adamw, lora.r: 0, or drop "
                                 f"{name} from lora.phases")
        return self


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "literal_error": "must be one of {expected}",
    "string_too_short": "must not be empty",
    "too_short": "must have at least {min_length} item(s)",
    "string_pattern_mismatch": "must match {pattern}",
    "union_tag_invalid": "unknown kind (expected one of {expected_tags})",
    "union_tag_not_found": "needs a 'kind' key",
}


def _format_loc(loc: tuple, tags: set[str]) -> str:
    """`('corpus', 'sources', 0, 'http', 'url')` -> `corpus.sources[0].url` (drops union tags)."""
    out = ""
    prev_index = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            prev_index = True
            continue
        if prev_index and part in tags:
            prev_index = False
            continue
        prev_index = False
        out += ("." if out else "") + str(part)
    return out


def format_error(err: dict, path: str = "params.yaml") -> str:
    ctx = err.get("ctx") or {}
    template = _MESSAGES.get(err["type"])
    msg = template.format(**ctx) if template else err["msg"]
    if err["type"] == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    key = _format_loc(err["loc"], tags={"local", "http", "hf"})
    if err["type"] == "value_error" and ": " in msg and not key.endswith(msg.split(": ", 1)[0]):
        sub, msg = msg.split(": ", 1)
        key = f"{key}.{sub}" if key else sub
    got = err.get("input")
    suffix = "" if err["type"] in ("missing", "value_error") or isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {key}: {msg}{suffix}"


def parse_params(data: dict | None, path: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError with one line per problem, first problem first."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as e:
        raise ParamsError("\n".join(format_error(err, path) for err in e.errors())) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return parse_params(data, str(path))
