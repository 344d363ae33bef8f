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
    max_model_len: int | None = Field(2048, ge=16, description="vLLM --max-model-len.")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half", "float"] = "auto"
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM's share of GPU memory (of RAM on the CPU); default 0.9 on a GPU, 0.12 on the CPU.",
    )
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    max_loras: int = Field(4, ge=1, description="Adapters vLLM keeps loaded at once.")
    max_lora_rank: int = Field(
        64, description="Largest adapter rank vLLM accepts: 8, 16, 32, 64, 128 or 256."
    )
    max_num_seqs: int | None = Field(None, ge=1)
    extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More vLLM flags, passed as they are."
    )
    startup_timeout_s: float = Field(900, gt=0)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v not in (8, 16, 32, 64, 128, 256):
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

    _split_keys = field_validator("api_keys", "admin_keys", mode="before")(_split)

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
    ):
        out += ["", f"[{section}]"]
        out += _describe_fields(model, section)
    return "\n".join(out) + "\n"
