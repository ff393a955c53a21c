"""Each sub-model's quantization: what its checkpoint states, and what vLLM's CPU kernels get
wrong or cannot run on this machine.

Every sub-model is built with its own quantization config (`steering.composite`), so a quantized
base serves beside full-precision experts and the reverse. What remains is vLLM's CPU build
itself (vLLM 0.32, measured on x86 CPUs of this project's kind):

- 4-bit weights (W4A16: compressed-tensors pack-quantized, GPTQ, AWQ) run on `cpu_gemm_wna16`,
  which only vLLM's AVX-512 extensions contain: on an AVX2 CPU the model loads, then its first
  forward fails.
- 8-bit weights beside unquantized activations (W8A16) have no CPU kernel.
- W8A8 int8 runs through oneDNN. Without VNNI (or AMX) oneDNN multiplies unsigned 8-bit
  activations by signed 8-bit weights with `vpmaddubsw`, which saturates the 16-bit sum of two
  products: 2 x 255 x 64 fits in 16 bits, 2 x 255 x 65 does not. A checkpoint whose weight codes
  all lie within +-64 computes exactly; beyond that the logits are silently wrong (measured: a
  logprob off by 4.0 with codes up to 127, 5e-6 with codes within 64). The codes are checked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The largest |int8 weight code| whose products oneDNN sums without saturating where it has no VNNI.
INT8_CODES_WITHOUT_VNNI = 64
_INT8_FLAGS = frozenset({"avx512_vnni", "amx_int8"})  # 32-bit int8 dot products in oneDNN's x86 kernels


@dataclass(frozen=True)
class Scheme:
    """How one group of a checkpoint's layers is quantized; activation_bits None: weight-only."""

    weight_type: str  # "int" or "float"
    weight_bits: int
    activation_bits: int | None = None


def quantization(hf_config) -> dict[str, Any] | None:
    """A checkpoint's quantization as its config states it (vLLM reads the same fields); None if none."""
    found = getattr(hf_config, "quantization_config", None) or getattr(hf_config, "compression_config", None)
    return found.to_dict() if hasattr(found, "to_dict") else found


def describe(found: dict[str, Any] | None) -> str:
    if found is None:
        return "not quantized"
    detail = ", ".join(str(found[key]) for key in ("format", "bits") if found.get(key) is not None)
    return f"quantized by {found.get('quant_method', 'an unnamed method')}" + (f" ({detail})" if detail else "")


def schemes(found: dict[str, Any] | None) -> tuple[Scheme, ...]:
    """The schemes of a compressed-tensors, GPTQ or AWQ config; () for any other method (vLLM's own
    checks then apply, unchecked here)."""
    if found is None:
        return ()
    if found.get("quant_method") == "compressed-tensors":
        groups = (found.get("config_groups") or {}).values()
        return tuple(_scheme(group["weights"], group.get("input_activations")) for group in groups
                     if group.get("weights"))
    bits = found.get("bits") or found.get("w_bit")
    if found.get("quant_method") in ("gptq", "awq") and bits:
        return (Scheme("int", int(bits)),)
    return ()


def _scheme(weights: dict, activations: dict | None) -> Scheme:
    return Scheme(weights.get("type", "int"), int(weights["num_bits"]),
                  int(activations["num_bits"]) if activations else None)


@dataclass(frozen=True)
class CpuKernels:
    """What vLLM's CPU build computes here, for quantized layers."""

    int4_weights: bool  # `cpu_gemm_wna16` is in the vLLM extension this CPU loads (the AVX-512 ones)
    exact_int8: bool  # oneDNN's int8 products accumulate in 32 bits (VNNI or AMX; any non-x86 CPU, unverified)

    @property
    def int8_code_limit(self) -> int:
        """The largest |weight code| a W8A8 int8 checkpoint may hold to compute exactly here."""
        return 127 if self.exact_int8 else INT8_CODES_WITHOUT_VNNI

    def describe(self) -> str:
        int8 = "VNNI: exact int8 products" if self.exact_int8 else "no VNNI: 16-bit saturating int8 products"
        int4 = "with" if self.int4_weights else "without"
        return f"this CPU ({int8}; vLLM's extension {int4} the 4-bit weight kernel)"

    @classmethod
    @functools.cache
    def detect(cls) -> CpuKernels:
        import vllm._custom_ops  # noqa: F401  loads the extension vLLM picks for this CPU
        from vllm.platforms import CpuArchEnum, current_platform

        x86 = current_platform.get_cpu_architecture() == CpuArchEnum.X86
        return cls(int4_weights=hasattr(torch.ops._C, "cpu_gemm_wna16"),
                   exact_int8=not x86 or bool(_cpu_flags() & _INT8_FLAGS))


def _cpu_flags() -> frozenset[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return next((frozenset(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")),
                frozenset())


def cpu_refusal(found: dict[str, Any] | None, kernels: CpuKernels) -> str | None:
    """Why vLLM's CPU build cannot run this quantization here, whatever the weights; None if it can."""
    for scheme in schemes(found):
        if scheme.weight_type != "int" or scheme.activation_bits is not None:
            continue
        if scheme.weight_bits == 4 and not kernels.int4_weights:
            return (f"is {describe(found)} with 4-bit weights, and vLLM's CPU kernel for them "
                    "(cpu_gemm_wna16) is built only into its AVX-512 extensions, which this CPU cannot load: "
                    "the engine would fail at its first forward; serve it on a CPU with AVX-512, or "
                    "a W8A8 int8 checkpoint")
        if scheme.weight_bits != 4:
            return (f"is {describe(found)} with {scheme.weight_bits}-bit weights and unquantized activations, "
                    "for which vLLM has no CPU kernel (its CPU weight-only kernel takes 4-bit weights)")
    return None


def int8_code_limit(found: dict[str, Any] | None, kernels: CpuKernels) -> int | None:
    """The bound on this checkpoint's int8 weight codes for exact results here; None if there is none."""
    int8 = Scheme("int", 8, 8)
    if kernels.exact_int8 or int8 not in schemes(found):
        return None
    return kernels.int8_code_limit


def code_beyond(tensor: torch.Tensor, limit: int) -> int | None:
    """An int8 weight code of `tensor` beyond +-limit (the largest in size), if any."""
    if tensor.dtype != torch.int8 or tensor.numel() == 0:
        return None
    low, high = int(tensor.min()), int(tensor.max())
    worst = low if -low > high else high
    return worst if abs(worst) > limit else None


def first_code_beyond(weights: Iterable[tuple[str, torch.Tensor]], limit: int) -> tuple[str, int] | None:
    """The first (name, code) among `weights` with an int8 code beyond +-limit."""
    for name, tensor in weights:
        code = code_beyond(tensor, limit)
        if code is not None:
            return name, code
    return None


def checkpoint_int8_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The int8 tensors of a local safetensors checkpoint, one at a time (headers read first)."""
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                if weights.get_slice(name).get_dtype() == "I8":
                    yield name, weights.get_tensor(name)


def codes_refusal(name: str, code: int, limit: int, kernels: CpuKernels) -> str:
    return (f"holds int8 weight code {code} (in {name}) beyond +-{limit}: on {kernels.describe()} oneDNN's "
            f"W8A8 kernel saturates 16-bit sums of two products beyond +-{limit} and the logits would be wrong; "
            f"quantize its weights to codes within +-{limit} (a scale of max|w|/{limit} per channel) or serve "
            "it on a CPU with AVX512-VNNI or AMX")


def checked_codes(name: str, weights: Iterable[tuple[str, torch.Tensor]], limit: int,
                  kernels: CpuKernels) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` passed through, refusing (ValueError) the first int8 code beyond +-limit."""
    for item in weights:
        code = code_beyond(item[1], limit)
        if code is not None:
            raise ValueError(f"{name} {codes_refusal(item[0], code, limit, kernels)}")
        yield item

