"""The daemon's settings: `adaptd.toml`, overridden by `ADAPTD_*` environment variables.

Read once at start-up into one frozen object. Sections in the TOML file map to
`ADAPTD_<SECTION>__<KEY>` variables (``[serving] max_loras`` is
``ADAPTD_SERVING__MAX_LORAS``); top-level keys are ``ADAPTD_<KEY>``. Lists in
the environment are comma-separated. Every error is reported at once, each
with its key's name.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG = Path("adaptd.toml")


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem."""


# The adapter ranks vLLM's LoRA buffers come in.
LORA_RANKS = (8, 16, 32, 64, 128, 256)


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServingSettings(_Section):
    vllm_url: str | None = Field(
        None, description="Use an already running vLLM server at this URL instead of starting one."
    )
    vllm_api_key: str | None = Field(None, description="API key of the external vLLM server.")
    max_model_len: int | None = Field(
        2048,
        ge=16,
        description="vLLM --max-model-len; capped at the model's own context length.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half", "float"] = "auto"
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "vLLM's share of GPU memory; default 0.9 on a GPU. On the CPU, set it only to use "
            "vLLM's own share of NUMA node 0 instead of serving.kv_cache_gib's amount."
        ),
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description=(
            "CPU: vLLM's KV cache in GiB. Default: sized at start from the model (16 sequences "
            "of max_model_len) and the memory available (at most a quarter of it, 4 GiB)."
        ),
    )
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    max_loras: int = Field(
        2,
        ge=1,
        description=(
            "Distinct adapters vLLM serves in one batch: the promoted version and the candidate "
            "(or a replaced version draining); more wait their turn."
        ),
    )
    max_lora_rank: int | None = Field(
        None,
        description=(
            "Largest adapter rank vLLM accepts: 8, 16, 32, 64, 128 or 256. Default: the "
            "smallest of those that holds training.rank (larger buffers slow every token)."
        ),
    )
    max_num_seqs: int | None = Field(None, ge=1)
    extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More vLLM flags, passed as they are."
    )
    startup_timeout_s: float = Field(900, gt=0)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v not in LORA_RANKS:
            raise ValueError("must be one of 8, 16, 32, 64, 128, 256")
        return v

    _split_args = field_validator("extra_args", mode="before")(
        lambda v: v.split() if isinstance(v, str) else v
    )


class LimitSettings(_Section):
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body (413 above).")
    max_tokens: int = Field(4096, ge=1, description="Cap on max_tokens / max_completion_tokens.")
    max_n: int = Field(8, ge=1, description="Cap on n and best_of.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Cap on the prompt's characters.")
    max_messages: int = Field(512, ge=1)
    max_header_bytes: int = Field(
        65_536, ge=1024, description="Largest request line and headers together (431 above)."
    )
    max_headers: int = Field(100, ge=8, description="Most headers in one request (431 above).")
    header_timeout_s: float = Field(
        10, gt=0, description="Time for a request's whole head to arrive (408 after)."
    )
    body_timeout_s: float = Field(
        30, gt=0, description="Longest pause between two reads of a request body (408 after)."
    )
    max_connections: int = Field(
        512, ge=1, description="Open connections at most; the next one is answered 503."
    )


class TrainingSettings(_Section):
    rank: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Layers that get an adapter (all linear layers of Llama/Qwen-style models).",
    )
    learning_rate: float = Field(
        1e-3, gt=0, description="Peak learning rate (LoRA on a few dozen examples)."
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "constant",
        description="Learning-rate schedule after warm-up; constant suits the stopping rule.",
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    steps: int | None = Field(None, ge=1, description="Exact optimizer steps (overrides epochs).")
    min_epochs: float = Field(2.0, gt=0, description="At least this many passes over the data.")
    max_epochs: float = Field(
        12.0, gt=0, description="At most this many passes; the stopping rule ends most runs sooner."
    )
    stop_learned: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="Stop once this share of the taught answers is learned, every token the "
        "model's most likely next (checked after each pass); unset: run every pass.",
    )
    min_steps: int = Field(1, ge=1, description="At least this many optimizer steps.")
    max_steps: int = Field(2000, ge=1, description="At most this many optimizer steps.")
    max_len: int = Field(1024, ge=32, description="Tokens per example and per packed row.")
    batch_tokens: int = Field(
        2048,
        ge=32,
        description="Tokens per optimizer step (training memory grows with it: 8192 was "
        "killed for memory on a 24 GiB CPU machine beside vLLM).",
    )
    seed: int = Field(0, description="Seed of the data order and the LoRA init.")
    warm_start: bool = Field(
        True, description="Continue from the promoted adapter (else a fresh one)."
    )
    targets: Literal["corrections", "rewrites"] = Field(
        "corrections",
        description="What the taught answers are: the corrections as users wrote them, or "
        "rewrites (self-distillation): the served version's own answer with the correction "
        "shown in context, where it keeps every content word of the correction.",
    )
    ewc_lambda: float = Field(
        1000.0, ge=0, description="EWC strength over a max-normalised Fisher; 0 turns EWC off."
    )
    ewc_decay: float = Field(
        0.9, ge=0, le=1, description="Online EWC: weight of earlier cycles' Fisher."
    )
    ewc_max_share: float | None = Field(
        0.5,
        ge=0,
        description="EWC's gradient may cancel at most this share of the task gradient's "
        "length (so it never pins what a new task needs); unset: uncapped.",
    )
    ewc_mode: Literal["gradient", "decoupled"] = Field(
        "decoupled",
        description="How EWC acts: 'decoupled', each weight is pulled back toward the promoted "
        "version's after every optimizer step, in proportion to its Fisher; 'gradient', its "
        "gradient joins the task's before the optimizer, capped by ewc_max_share (which "
        "applies to this mode only).",
    )
    max_restarts: int = Field(2, ge=0, description="Resumes after a crash of the training child.")
    gpu_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="Cap on training's share of GPU memory (vLLM holds the rest)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Trade GPU time for memory (a card shared tightly with vLLM)."
    )

    _split_targets = field_validator("target_modules", mode="before")(_split)


class ReplaySettings(_Section):
    ratio: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="Replayed examples per new example (0 turns replay off); with EWC, one "
        "forgets less than three without it at half the training (docs/benchmarks.md).",
    )
    min_examples: int = Field(
        64,
        ge=0,
        description="At least this many general and self-replayed examples in a cycle that "
        "replays: a small cycle's few, seen every pass, would be memorised.",
    )
    loss: Literal["kl", "ce"] = Field(
        "kl",
        description="How replayed answers are fitted: kl, to the served version's next-token "
        "distribution along them (distillation); ce, to their tokens.",
    )
    general_share: float = Field(0.3, ge=0, description="Share of replay from `general_path`.")
    self_share: float = Field(
        0.4, ge=0, description="Share of replay from the served version's own answers."
    )
    past_share: float = Field(
        0.3,
        ge=0,
        description="Share of replay from earlier cycles' examples; they come on top of the "
        "general and self replay, which keep the whole budget.",
    )
    general_path: str | None = Field(
        None, description="General data: a JSONL file or a saved datasets folder."
    )
    prompts_path: str | None = Field(
        None, description="A file of general prompts (one per line) for self-replay."
    )
    reservoir_size: int = Field(2000, ge=0, description="Earlier examples kept for replay.")
    self_max_tokens: int = Field(256, ge=1, description="Length cap of self-replay answers.")


class CurationConfig(_Section):
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Interactions kept out of training."
    )
    max_example_chars: int = Field(8000, ge=1, description="Longest example kept.")
    max_per_user: int = Field(50, ge=1, description="Most examples one user gives a cycle.")
    max_user_share: float = Field(
        0.25, gt=0, le=1, description="Largest share of a cycle one user gives."
    )
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Similarity above which items are duplicates."
    )
    drop_suspected_triggers: bool = Field(
        True,
        description="Drop clusters of one answer behind an unusual shared phrase (a planted "
        "trigger); they are listed in the report either way.",
    )
    trigger_min_examples: int = Field(
        3, ge=2, description="Fewest prompts sharing a phrase and an answer to suspect a trigger."
    )


class EvaluationSettings(_Section):
    max_tokens: int = Field(128, ge=1, description="Length cap of answers generated to score.")
    concurrency: int = Field(8, ge=1, description="Evaluation requests sent to vLLM at once.")
    general_prompts_path: str | None = Field(
        None,
        description="JSONL of general prompts (`prompt` or `messages`); default: a built-in set.",
    )
    general_text_path: str | None = Field(
        None, description="JSONL of held-out general text (`text`) scored by likelihood."
    )
    choices_path: str | None = Field(
        None,
        description="JSONL of multiple-choice items (`question`, `choices`, `answer`).",
    )
    golden_path: str | None = Field(
        None,
        description="JSONL golden suite (`prompt`, `must_contain`, `must_not_contain`, `regex`, "
        "`exact`).",
    )
    canaries_path: str | None = Field(
        None, description="JSONL of canary prompts whose answers must stay put."
    )
    max_taught_items: int = Field(
        200, ge=0, description="Most of the cycle's trained corrections checked for content."
    )
    max_retention_items: int = Field(
        200, ge=0, description="Most held-out items of earlier cycles scored for retention."
    )
    bootstrap_resamples: int = Field(2000, ge=100, description="Paired bootstrap resamples.")
    confidence: float = Field(0.9, gt=0.5, lt=1, description="Confidence of the intervals.")
    seed: int = Field(0, description="Seed of the bootstrap.")


class GateSettings(_Section):
    mode: Literal["auto", "manual"] = Field(
        "auto", description="`auto` promotes a passing candidate; `manual` waits for a person."
    )
    min_holdout: int = Field(
        3, ge=1, description="Fewest held-out feedback items a candidate is judged on."
    )
    min_taught_learned: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Least share of the trained corrections the candidate must answer with "
        "their content (their words that neither the prompt nor the served answer had).",
    )
    min_task_gain: float = Field(
        0.0,
        description="Least ROUGE-L gain over the current version on held-out feedback (when no "
        "correction carries content, e.g. a house style).",
    )
    require_significant_gain: bool = Field(
        True, description="The gain's confidence interval must lie above zero."
    )
    max_general_regression: float = Field(
        0.02, ge=0, description="Most relative rise of general held-out NLL over the base model."
    )
    min_general_agreement: float = Field(
        0.0, ge=0, le=1, description="Least ROUGE-L agreement with the base model's answers."
    )
    max_retention_loss: float = Field(
        0.05, ge=0, description="Most ROUGE-L lost on earlier cycles' held-out feedback."
    )
    golden_must_pass: bool = Field(
        True, description="A golden case passing on the current version must pass."
    )
    canary_max_change: float = Field(
        0.5, ge=0, le=1, description="Most change (1 - ROUGE-L) of a canary's answer."
    )
    max_trigger_lift: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Most rise, over the current version, in the share of unrelated prompts a "
        "suspected trigger phrase turns into its payload answer.",
    )
    drain_timeout_s: float = Field(
        120, gt=0, description="How long a replaced version waits for its requests to finish."
    )


class ScheduleSettings(_Section):
    enabled: bool = Field(
        True, description="Start cycles on a schedule (manual cycles always work)."
    )
    interval_minutes: float | None = Field(
        60, gt=0, description="Check for a cycle this often (ignored when `cron` is set)."
    )
    cron: str | None = Field(
        None, description="A crontab expression (`minute hour day month weekday`) instead."
    )
    timezone: str = Field("UTC", description="Time zone of the cron expression.")
    min_new_feedback: int = Field(
        20,
        ge=0,
        description="Start only with at least this many feedback items since the last cycle.",
    )
    min_minutes_between: float = Field(
        30, ge=0, description="Start no sooner than this after the last cycle began."
    )

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 5:
            raise ValueError("expected five fields: minute hour day month weekday")
        return value


class StoreSettings(_Section):
    log_queue_size: int = Field(
        10_000,
        ge=16,
        description="Pending writes before interaction logs are dropped (and counted).",
    )


class Settings(BaseSettings):
    """Everything the daemon reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="ADAPTD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(
        Path("adaptd-data"), description="Where the database, adapters and reports live."
    )
    host: str = Field("127.0.0.1", description="Address the gateway binds.")
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(
        None, description="A local model folder or a hub id; default SmolLM2-135M-Instruct."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Inference keys (comma-separated in the environment)."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Admin keys (comma-separated in the environment)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: float = Field(
        30, gt=0, description="How long a stop waits for requests in flight."
    )
    serving: ServingSettings = Field(default_factory=ServingSettings)  # type: ignore[arg-type]
    limits: LimitSettings = Field(default_factory=LimitSettings)  # type: ignore[arg-type]
    store: StoreSettings = Field(default_factory=StoreSettings)  # type: ignore[arg-type]
    training: TrainingSettings = Field(default_factory=TrainingSettings)  # type: ignore[arg-type]
    replay: ReplaySettings = Field(default_factory=ReplaySettings)  # type: ignore[arg-type]
    curation: CurationConfig = Field(default_factory=CurationConfig)  # type: ignore[arg-type]
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)  # type: ignore[arg-type]
    gate: GateSettings = Field(default_factory=GateSettings)  # type: ignore[arg-type]
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)  # type: ignore[arg-type]

    _split_keys = field_validator("api_keys", "admin_keys", mode="before")(_split)

    @model_validator(mode="after")
    def _lora_rank_holds_training(self) -> Settings:
        rank, served = self.training.rank, self.serving.max_lora_rank
        if served is not None and served < rank:
            raise ValueError(
                f"serving.max_lora_rank {served} is below training.rank {rank}: vLLM would refuse "
                f"every adapter adaptd trains; raise serving.max_lora_rank or leave it unset"
            )
        return self

    @model_validator(mode="after")
    def _bind_needs_keys(self) -> Settings:
        if not self.api_keys and not self.admin_keys and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no keys are configured: "
                "set ADAPTD_API_KEYS and ADAPTD_ADMIN_KEYS, or bind 127.0.0.1"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = Path(os.environ.get("ADAPTD_CONFIG", DEFAULT_CONFIG))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml.exists():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "adaptd.db"

    @property
    def max_lora_rank(self) -> int:
        """vLLM's largest adapter rank: ``serving.max_lora_rank``, or the smallest that holds
        ``training.rank`` (vLLM sizes its LoRA buffers by it, and every token pays for them)."""
        served = self.serving.max_lora_rank
        return served or next(r for r in LORA_RANKS if r >= self.training.rank)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ".".join(parts) if parts else "config"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; raise `ConfigError` listing every problem at once."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = _key_name(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
            env = "ADAPTD_" + key.upper().replace(".", "__")
            lines.append(f"{key} [{env}]: {msg}{shown}" if key != "config" else msg)
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
    except (OSError, ValueError) as e:  # unreadable or malformed TOML
        raise ConfigError(f"cannot read the configuration: {e}") from e


def _toml_value(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _describe_fields(model: type[BaseModel], section: str | None) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        if isinstance(field.default_factory, type) and issubclass(field.default_factory, _Section):
            continue
        env = "ADAPTD_" + (f"{section.upper()}__" if section else "") + name.upper()
        desc = field.description or ""
        default = field.get_default(call_default_factory=True)
        lines.append(f"# {desc} [{env}]".replace("#  [", "# ["))
        lines.append(f"# {name} = {_toml_value(default)}")
    return lines


def example_toml() -> str:
    """A commented adaptd.toml listing every key with its default and variable."""
    out = [
        "# adaptd configuration. Every key can be overridden by the ADAPTD_ variable in brackets.",
        "# Uncomment a line to change it.",
        "",
    ]
    out += _describe_fields(Settings, None)
    for section, model in (
        ("serving", ServingSettings),
        ("limits", LimitSettings),
        ("store", StoreSettings),
        ("training", TrainingSettings),
        ("replay", ReplaySettings),
        ("curation", CurationConfig),
        ("evaluation", EvaluationSettings),
        ("gate", GateSettings),
        ("schedule", ScheduleSettings),
    ):
        out += ["", f"[{section}]"]
        out += _describe_fields(model, section)
    return "\n".join(out) + "\n"
