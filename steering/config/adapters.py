"""PEFT LoRA adapters as tuned experts: a pair's `tuned` may name an adapter folder over its `untuned`.

The adapter is checked against the untuned model (architecture, modules, shapes), merged with
PEFT's own `merge_and_unload` in float32, and kept in a cache keyed by the contents of both
folders, so that the engine serves an ordinary checkpoint: a merged tuned expert costs what any
tuned expert costs, one small-model forward per step. Refusals are `ConfigError`s naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from steering.config.schema import ExpertPair
from steering.errors import ConfigError

logger = logging.getLogger("steer.adapters")
ADAPTER_CONFIG = "adapter_config.json"
CACHE_VARIABLE = "STEER_ADAPTER_CACHE"  # else $XDG_CACHE_HOME/steering/adapters, else ~/.cache/steering/adapters
MERGE_VERSION = 1  # in every cache key: a change to how merged folders are written invalidates the old ones
PEFT_PREFIX = "base_model.model."  # PEFT's saved keys name the untuned model's modules under it
# A LoRA tensor's dimension that must equal one of its module's weight dimensions: (tensor dim, weight dim).
# Linear weights are [out, in] (A: [r, in], B: [out, r]); embedding weights [num, dim] (A: [r, num], B: [dim, r]).
LORA_DIMS = {
    ".lora_A.weight": (1, 1),
    ".lora_B.weight": (0, 0),
    ".lora_B.bias": (0, 0),
    ".lora_magnitude_vector": (0, 0),
    ".lora_embedding_A": (1, 0),
    ".lora_embedding_B": (0, 1),
}


def is_adapter(path: str) -> bool:
    """A local PEFT adapter folder: an adapter config and no model config of its own."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").exists()


def cache_root() -> Path:
    """Where merged adapters are kept: $STEER_ADAPTER_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "steering" / "adapters"


def tuned_checkpoint(name: str, pair: ExpertPair, *, cache: Path | None = None) -> str:
    """The checkpoint that runs as pair `name`'s tuned expert: `pair.tuned` itself, or for an
    adapter, the adapter merged over `pair.untuned` (from the cache; merged now if absent)."""
    if not is_adapter(pair.tuned):
        return pair.tuned
    field = f"experts.{name}"
    if not (Path(pair.untuned) / "config.json").is_file():
        raise ConfigError(f"{field}.untuned", f"{pair.untuned!r} is no local checkpoint folder, and the adapter "
                                              f"{field}.tuned is merged over it: download it and name its folder")
    cache = cache or cache_root()
    merged = cache / merge_key(pair.tuned, pair.untuned, cache)
    if merged.is_dir():
        return str(merged)
    check_fit(f"{field}.tuned", pair.tuned, pair.untuned)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{field}.tuned", f"cannot keep the merged adapter in {str(cache)!r} ({error.strerror}); "
                                            f"set {CACHE_VARIABLE} to a writable folder") from None
    started = time.monotonic()
    try:
        _merge(pair.tuned, pair.untuned, merged)
    except (OSError, RuntimeError, ValueError) as error:  # what PEFT and transformers raise, a full disk
        raise ConfigError(f"{field}.tuned", f"could not merge it over {pair.untuned!r}: {error}") from None
    logger.info("%s.tuned: merged LoRA adapter %s over %s into %s (%.1f s)", field, pair.tuned, pair.untuned, merged,
                time.monotonic() - started)
    return str(merged)


def merge_key(adapter: str, untuned: str, cache: Path) -> str:
    """The merged folder's name: a digest of both folders' files, by content (so copies share it)."""
    parts = [f"v{MERGE_VERSION}", _folder_digest(Path(adapter), cache), _folder_digest(Path(untuned), cache)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _folder_digest(folder: Path, cache: Path) -> str:
    """Every top-level file of `folder` (hidden ones aside), by name and content."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    lines = [f"{file.name}\0{_file_digest(file, cache / 'index')}" for file in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _file_digest(file: Path, index: Path) -> str:
    """A file's sha256, remembered under its path, size, mtime and inode: a cached hit costs a stat
    per file, and a file rewritten in place changes at least its mtime."""
    stat = file.stat()
    identity = f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    memo = index / hashlib.sha256(identity.encode()).hexdigest()
    try:
        remembered = memo.read_text()
        if len(remembered) == 64:
            return remembered
    except OSError:
        pass
    with file.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    try:  # a memo only saves time: a cache folder that cannot take one (read-only) still serves
        index.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=index, delete=False) as staged:
            staged.write(digest)
        os.replace(staged.name, memo)
    except OSError:
        pass
    return digest


def check_fit(field: str, adapter: str, untuned: str) -> None:
    """Refuse an adapter that does not fit the untuned model: not LoRA, trained over another
    architecture, or weights for modules it lacks or of other shapes. The untuned's weights are
    not loaded: its modules are built on the meta device."""
    import torch
    from peft.utils import load_peft_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        settings = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(field, f"cannot read the adapter's {ADAPTER_CONFIG}: {error}") from None
    if settings.get("peft_type") != "LORA":
        raise ConfigError(field, f"is a {settings.get('peft_type')} adapter; only LoRA adapters are merged")
    try:
        config = AutoConfig.from_pretrained(untuned)
    except (OSError, ValueError) as error:
        raise ConfigError(field, f"cannot read the config of the untuned {untuned!r}: {error}") from None
    trained_over = _recorded_base_type(settings.get("base_model_name_or_path"))
    if trained_over is not None and trained_over != config.model_type:
        raise ConfigError(field, f"was trained over a {trained_over} model ({settings['base_model_name_or_path']}), "
                                 f"and the pair's untuned {untuned!r} is a {config.model_type} model")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise ConfigError(field, f"transformers has no causal LM class of the untuned's type: {error}") from None
    weights = {name: param.shape for name, param in model.named_parameters(remove_duplicate=False)}
    modules = {name for name, _ in model.named_modules()}
    try:
        tensors = load_peft_weights(adapter, device="cpu")
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(field, f"cannot read the adapter's weights: {error}") from None
    swap = bool(settings.get("fan_in_fan_out"))  # Conv1D-style weights are stored [in, out]
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_DIMS if name.endswith(s)), None)
        if suffix is None:  # a whole weight the adapter replaces (modules_to_save, a saved embedding)
            target = name.replace(".base_layer.", ".")
            if target not in weights:
                raise ConfigError(field, f"holds {key!r}, and the untuned model has no weight {target!r}")
            if tuple(tensor.shape) != tuple(weights[target]):
                raise ConfigError(field, f"{key!r} has shape {list(tensor.shape)}, and the untuned model's {target!r} "
                                         f"has {list(weights[target])}")
            continue
        module = name.removesuffix(suffix)
        if module not in modules or f"{module}.weight" not in weights:
            raise ConfigError(field, f"adapts module {module!r}, which the untuned model ({config.model_type}, "
                                     f"{untuned!r}) does not have")
        mine, theirs = LORA_DIMS[suffix]
        if swap and suffix in (".lora_A.weight", ".lora_B.weight"):
            theirs = 1 - theirs
        shape = weights[f"{module}.weight"]
        if tensor.dim() <= mine or tensor.shape[mine] != shape[theirs]:
            raise ConfigError(field, f"{key!r} has shape {list(tensor.shape)}, which does not fit the untuned model's "
                                     f"{module}.weight of shape {list(shape)}")
    if not any(key.endswith(tuple(LORA_DIMS)) for key in tensors):
        raise ConfigError(field, "holds no LoRA weights")


def _recorded_base_type(name: str | None) -> str | None:
    """The model type of the checkpoint the adapter names as its base, where it can be read without
    a download (a local folder, or the Hugging Face cache); None where it cannot."""
    from transformers import AutoConfig

    if not name:
        return None
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def _merge(adapter: str, untuned: str, merged: Path) -> None:
    """PEFT's merge in float32, with the untuned's tokenizer, written to a staging folder beside
    `merged` and renamed into place: a racing process finds no folder or a whole one."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(untuned, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{merged.name}-", dir=merged.parent))
    try:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(untuned).save_pretrained(staging)
        provenance = {"adapter": adapter, "untuned": untuned, "peft": peft.__version__}
        (staging / "merged_from.json").write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            staging.rename(merged)
        except OSError:
            if not merged.is_dir():
                raise  # else another process merged the same adapter first: keep its folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
