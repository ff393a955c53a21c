"""The deployment's `engine` section: vLLM's own engine options, checked against vLLM's declared types.

Any `AsyncEngineArgs` field may be set, except those the service sets itself; a value of the
wrong type is refused at load, naming the field, against the annotation vLLM declares for it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PydanticUserError,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from steering.errors import ConfigError
from steering.memory import GiB

# Engine options the service sets itself; a config that sets them would silently break steering.
RESERVED_ENGINE_OPTIONS = frozenset(
    {"model", "tokenizer", "hf_overrides", "logits_processors", "logprobs_mode", "skip_tokenizer_init"}
)
# Engine options the deployment sets at its top level, since the service reads them too.
TOP_LEVEL_OPTIONS = frozenset({"reasoning_parser"})
KV_CACHE_SIZES = ("kv_cache_gib", "kv_cache_memory_bytes", "gpu_memory_utilization")


@functools.cache
def _engine_option_adapter(name: str) -> TypeAdapter | None:
    """A validator of `AsyncEngineArgs.<name>`'s declared type; None where the type has no schema."""
    from vllm.engine import arg_utils

    annotation = arg_utils.AsyncEngineArgs.__dataclass_fields__[name].type
    try:  # the annotation is a string (postponed evaluation) in vLLM's module namespace
        return TypeAdapter(eval(annotation, vars(arg_utils)) if isinstance(annotation, str) else annotation)
    except (NameError, TypeError, PydanticUserError):  # imported for type checking only, or no schema
        return None


def _check_engine_option(name: str, value: Any) -> None:
    """A wrong type is refused at load, naming the field, not met as a traceback at engine start."""
    adapter = _engine_option_adapter(name)
    if adapter is None:
        return
    try:
        adapter.validate_python(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"engine.{name}" + (f".{where}" if where else ""), f"{first['msg']} (got {value!r})") from None


class EngineOptions(BaseModel):
    """Options passed to vLLM's engine as they are (any `AsyncEngineArgs` field but the reserved).

    The KV cache is sized by at most one of `kv_cache_gib`, `kv_cache_memory_bytes` and
    `gpu_memory_utilization`. With none on CPU, the service sizes it in bytes from the models
    (`steering.memory`); on GPU vLLM's own default fraction applies.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    dtype: str = "auto"
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="vLLM's share of device memory; on CPU a share of the NUMA node (checked).")
    kv_cache_memory_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="KV cache size per worker in bytes (vLLM's option).")
    kv_cache_gib: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="KV cache size per worker in GiB: kv_cache_memory_bytes, for people.")
    seed: int = 0
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    pipeline_parallel_size: Literal[1] = 1

    @field_validator("pipeline_parallel_size", mode="before")
    @classmethod
    def _one_stage(cls, value: Any) -> Any:
        if value != 1:
            raise ValueError("the composite runs every sub-model on every token inside one model, so its layers "
                             "cannot be cut into pipeline stages; spread a large base with tensor_parallel_size")
        return value

    @model_validator(mode="after")
    def _known_options(self) -> EngineOptions:
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = set(AsyncEngineArgs.__dataclass_fields__)
        for name in self.model_extra or {}:
            if name in RESERVED_ENGINE_OPTIONS:
                raise ConfigError(f"engine.{name}", "is set by the steering service, not the config")
            if name in TOP_LEVEL_OPTIONS:
                raise ConfigError(f"engine.{name}", f"is set by the config's top-level {name}, which the server reads "
                                                    "too; set it there")
            if name not in known:
                raise ConfigError(f"engine.{name}", "is not a vLLM engine option (AsyncEngineArgs)")
            _check_engine_option(name, self.model_extra[name])
        sizes = [name for name in KV_CACHE_SIZES if getattr(self, name) is not None]
        if len(sizes) > 1:
            raise ConfigError(f"engine.{sizes[1]}", f"give one of {', '.join(KV_CACHE_SIZES)}; {sizes[0]} is set too")
        return self

    @property
    def kv_cache_size(self) -> tuple[str, int] | None:
        """(field, bytes) of an explicit KV cache size, if the config gives one."""
        if self.kv_cache_gib is not None:
            return "engine.kv_cache_gib", int(self.kv_cache_gib * GiB)
        if self.kv_cache_memory_bytes is not None:
            return "engine.kv_cache_memory_bytes", self.kv_cache_memory_bytes
        return None

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump(exclude_none=True, exclude={"kv_cache_gib"})
        if self.kv_cache_size is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_size[1]
        return kwargs
