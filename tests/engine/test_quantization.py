"""Each sub-model with its own quantization: a W8A8 int8 base beside float32 experts, and a W8A8
expert beside a float32 one of the same architecture, in one engine, against vLLM serving that
checkpoint alone; what vLLM's CPU kernels cannot run, or would compute wrongly, is refused at load.

The W8A8 checkpoint fits this CPU (`steering.quantization`): weight codes within +-64 where it has
no VNNI (the AMD EPYC kind), the full +-127 where it has (the Intel Xeon kind); the test ids say
which ran. Refusals for the other kind of CPU are tested with its kernels stood in.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from steering_tools.fixtures import quantize_w8a8, quantize_weights_only
from steering_tools.reference import ReferenceSteerer
from vllm import SamplingParams

from steering.config import load_deployment, parse_deployment
from steering.errors import ConfigError, EngineStartError
from steering.memory import checkpoint_bytes
from steering.quantization import CpuKernels, checked_codes, cpu_refusal, int8_code_limit, quantization
from tests.engine.conftest import LiveEngine

KERNELS = CpuKernels.detect()
SCHEME = f"w8a8-int8-codes-within-{KERNELS.int8_code_limit}"  # what this CPU computes exactly
AMD_EPYC = CpuKernels(int4_weights=False, exact_int8=False)  # AVX2, no AVX-512, no VNNI
XEON = CpuKernels(int4_weights=True, exact_int8=True)  # AVX-512 with VNNI
SKYLAKE = CpuKernels(int4_weights=True, exact_int8=False)  # AVX-512 without VNNI

TEXTS = ["the model answers the question", "every cat reads a long story before noon.", "our team"]
ALPHA = {"chat": 1.5, "quant": 2.0}
# The base alone and vLLM alone run the same kernels on the same weights: equal to the last bit
# here; 1e-5 (a few float32 ulps at these logprobs) leaves room for float32 GEMMs blocked by
# another batch shape where requests reach the engine's steps otherwise.
SAME_KERNELS = 1e-5
# Against torch (the float32 experts in transformers, the W8A8 layer emulated): 1e-4, as every
# float32 comparison of the engine against transformers in this suite. Measured here: 1e-5
# steered, 4e-6 for the emulation; codes beyond +-64 without VNNI miss it by 4.0.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(llama_family, tmp_path_factory) -> dict[str, str]:
    """The family's base quantized several ways; `base` fits this CPU, `copy` is it in another folder."""
    root = tmp_path_factory.mktemp("quantized")
    source = llama_family["base"]
    made = {
        "base": quantize_w8a8(source, root / "base", max_code=KERNELS.int8_code_limit),
        "codes-64": quantize_w8a8(source, root / "codes-64", max_code=64),
        "codes-127": quantize_w8a8(source, root / "codes-127", max_code=127),
        "w4a16": quantize_weights_only(source, root / "w4a16", bits=4),
        "w8a16": quantize_weights_only(source, root / "w8a16", bits=8),
    }
    made["copy"] = shutil.copytree(made["base"], root / "copy")
    print(f"quantized base: {SCHEME} on {KERNELS.describe()}")
    return {name: str(path) for name, path in made.items()}


def composite_config(llama_family, checkpoints, **engine) -> dict:
    """A W8A8 base, the float32 `chat` pair, and `quant`: a W8A8 copy of the base (its own
    sub-model) tuned over the float32 base it was quantized from."""
    return {
        "base": checkpoints["base"],
        "experts": {"chat": llama_family["experts"]["chat"],
                    "quant": {"tuned": checkpoints["copy"], "untuned": llama_family["base"]}},
        "policies": {"base": {}, "any": {"max_alpha": 100.0}},
        "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "max_logprobs": -1, **engine},
    }


def write(tmp_path, config: dict):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Alone:
    """vLLM serving one checkpoint, nothing of ours around it."""

    def __init__(self, path: str):
        from vllm import LLM

        self.llm = LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, max_logprobs=-1,
                       kv_cache_memory_bytes=64 << 20)

    def run(self, prompts, params: SamplingParams):
        return self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)

    def logprobs_over(self, tokens) -> torch.Tensor:
        """[L - 1, V] log-probabilities of the token after each of tokens[:-1], teacher-forced."""
        (output,) = self.run([tokens], SamplingParams(max_tokens=1, prompt_logprobs=-1))
        rows = output.prompt_logprobs[1:]
        return torch.tensor([[row[t].logprob for t in range(len(row))] for row in rows])

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def alone(checkpoints):
    served = Alone(checkpoints["base"])
    yield served
    served.close()


@pytest.fixture(scope="module")
def composite(llama_family, checkpoints):
    engine = LiveEngine(composite_config(llama_family, checkpoints))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(llama_family, checkpoints) -> ReferenceSteerer:
    """The W8A8 base emulated in torch (as a CPU with VNNI computes it), the experts in float32."""
    chat = llama_family["experts"]["chat"]
    return ReferenceSteerer(checkpoints["base"], {"chat": (chat["tuned"], chat["untuned"]),
                                                 "quant": (checkpoints["copy"], llama_family["base"])})


@pytest.mark.parametrize("scheme", [SCHEME])
def test_vllm_alone_computes_the_checkpoint_right_on_this_cpu(alone, reference, tokenizer, scheme):
    # The premise of serving it: with codes beyond +-64 on a CPU without VNNI this is off by up to
    # 4 in logprob (measured), which no comparison with vLLM itself would show.
    for text in TEXTS:
        tokens = tokenizer.encode(text)
        want = reference.steer_over(tokens, {}, {})[:-1]
        torch.testing.assert_close(alone.logprobs_over(tokens), want, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("scheme", [SCHEME])
def test_base_alone_equals_vllm_serving_the_checkpoint_alone(composite, alone, tokenizer, scheme):
    batch = [tokenizer.encode(text) for text in TEXTS]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0)
    got = composite.outputs(batch, [{}] * len(batch), params)
    want = alone.run(batch, params)
    for mine, theirs in zip(got, want):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert chosen_logprobs(mine) == pytest.approx(chosen_logprobs(theirs), abs=SAME_KERNELS)


@pytest.mark.parametrize("scheme", [SCHEME])
def test_steered_equals_the_quantized_base_plus_the_experts_deltas(composite, alone, reference, tokenizer, scheme):
    """The quantized logits from vLLM alone (the base, and the `quant` pair's tuned copy of it),
    the float32 ones from transformers: each greedy token is the argmax of their sum."""
    batch = [tokenizer.encode(text) for text in TEXTS]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)
    steered = composite.outputs(batch, [ALPHA] * len(batch), params)
    unsteered = composite.outputs(batch, [{}] * len(batch), params)
    for prompt, output, plain in zip(batch, steered, unsteered):
        answer = list(output.outputs[0].token_ids)
        tokens = prompt + answer
        base = alone.logprobs_over(tokens)  # [L - 1, V]: after each of tokens[:-1]
        want = reference.steer_over(tokens[:-1], ALPHA, {"base": base, "quant.tuned": base})[len(prompt) - 1:]
        assert answer == want.argmax(dim=-1).tolist()
        assert chosen_logprobs(output) == pytest.approx([want[i, t].item() for i, t in enumerate(answer)],
                                                        abs=TOLERANCE)
        assert answer != list(plain.outputs[0].token_ids), "steering changed nothing"


def chosen_logprobs(output) -> list[float]:
    completion = output.outputs[0]
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]


def test_mixed_precision_deployments_load(llama_family, checkpoints, tmp_path):
    # A W8A8 base beside float32 experts, and a float32 base beside a W8A8 expert.
    assert load_deployment(write(tmp_path, composite_config(llama_family, checkpoints))).pair_names == ("chat", "quant")
    experts = {"chat": {"tuned": checkpoints["copy"], "untuned": llama_family["experts"]["chat"]["untuned"]}}
    config = {**composite_config(llama_family, checkpoints), "base": llama_family["base"], "experts": experts}
    assert load_deployment(write(tmp_path, config)).pair_names == ("chat",)


@pytest.mark.parametrize(("checkpoint", "kernels", "refused"), [
    ("codes-64", XEON, None), ("codes-127", XEON, None), ("w4a16", XEON, None),
    ("codes-64", SKYLAKE, None), ("codes-127", SKYLAKE, "int8 weight code"), ("w4a16", SKYLAKE, None),
    ("codes-64", AMD_EPYC, None), ("codes-127", AMD_EPYC, "int8 weight code"), ("w4a16", AMD_EPYC, "cpu_gemm_wna16"),
    ("w8a16", XEON, "no CPU kernel"), ("w8a16", AMD_EPYC, "no CPU kernel"),
])
def test_what_each_cpu_refuses_at_load_names_the_sub_model(llama_family, checkpoints, tmp_path, monkeypatch,
                                                           checkpoint, kernels, refused):
    monkeypatch.setattr(CpuKernels, "detect", lambda: kernels)
    chat = llama_family["experts"]["chat"]
    for field, config in [
        ("base", {**composite_config(llama_family, checkpoints), "base": checkpoints[checkpoint],
                  "experts": {"chat": chat}}),
        ("experts.chat.tuned", {**composite_config(llama_family, checkpoints), "base": llama_family["base"],
                                "experts": {"chat": {"tuned": checkpoints[checkpoint], "untuned": chat["untuned"]}}}),
    ]:
        if refused is None:
            load_deployment(write(tmp_path, config))
            continue
        with pytest.raises(ConfigError) as caught:
            load_deployment(write(tmp_path, config))
        assert caught.value.field == field
        assert refused in caught.value.reason


def test_the_code_refusal_says_why_and_what_to_do(llama_family, checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(CpuKernels, "detect", lambda: AMD_EPYC)
    config = {**composite_config(llama_family, checkpoints), "base": checkpoints["codes-127"]}
    with pytest.raises(ConfigError) as caught:
        load_deployment(write(tmp_path, config))
    assert caught.value.field == "base"
    assert caught.value.reason.startswith("holds int8 weight code ")
    assert "beyond +-64: on this CPU (no VNNI: 16-bit saturating int8 products" in caught.value.reason
    assert "quantize its weights to codes within +-64" in caught.value.reason


def test_the_composite_checks_int8_codes_as_they_load():
    weights = [("a.weight", torch.tensor([[-64, 64]], dtype=torch.int8)), ("a.weight_scale", torch.ones(1) * 300.0),
               ("b.weight", torch.tensor([[3, -65]], dtype=torch.int8))]
    passed = checked_codes("experts.chat.tuned", iter(weights), 64, AMD_EPYC)
    assert next(passed)[0] == "a.weight" and next(passed)[0] == "a.weight_scale"
    with pytest.raises(ValueError, match=r"^experts\.chat\.tuned holds int8 weight code -65 \(in b\.weight\)"):
        next(passed)


def test_each_scheme_is_read_from_its_checkpoint(checkpoints):
    from transformers import AutoConfig

    found = {name: quantization(AutoConfig.from_pretrained(path)) for name, path in checkpoints.items()}
    assert cpu_refusal(found["base"], AMD_EPYC) is None and int8_code_limit(found["base"], AMD_EPYC) == 64
    assert int8_code_limit(found["base"], XEON) is None and int8_code_limit(found["w4a16"], AMD_EPYC) is None
    assert cpu_refusal(found["w4a16"], AMD_EPYC).startswith("is quantized by compressed-tensors (pack-quantized) with "
                                                             "4-bit weights")


def test_weights_are_counted_at_their_stored_width(llama_family, checkpoints):
    from safetensors import safe_open

    full = checkpoint_bytes(llama_family["base"], torch.float32)
    quantized = checkpoint_bytes(checkpoints["base"], torch.float32)
    with safe_open(f"{checkpoints['base']}/model.safetensors", "pt") as weights:
        codes = sum(weights.get_tensor(name).numel() for name in weights.keys() if name.endswith("proj.weight"))
        scales = sum(weights.get_tensor(name).numel() for name in weights.keys() if name.endswith("weight_scale"))
    assert full - quantized == 3 * codes - 4 * scales  # each linear weight 1 byte instead of 4, plus its scales
    assert checkpoint_bytes(llama_family["base"], torch.bfloat16) == full // 2


def test_the_engine_refuses_what_this_cpu_gets_wrong_where_load_checks_were_skipped(
    llama_family, checkpoints, capfd
):
    # `parse_deployment` checks the schema only: the composite refuses as it builds or loads the
    # expert, beside a float32 base. Codes beyond +-64 where this CPU has no VNNI (refused as the
    # weights load); 8-bit weight-only (no CPU kernel) where it has (refused as the expert is built).
    # The refusal reaches the caller as the engine's failure to start; its log names the sub-model.
    expert, reason = ("codes-127", "holds int8 weight code") if not KERNELS.exact_int8 else ("w8a16", "no CPU kernel")
    experts = {"chat": {"tuned": checkpoints[expert], "untuned": llama_family["experts"]["chat"]["untuned"]}}
    deployment = parse_deployment({**composite_config(llama_family, checkpoints, kv_cache_memory_bytes=64 << 20),
                                   "base": llama_family["base"], "experts": experts})
    from steering.engine import SteeringEngine

    with pytest.raises(EngineStartError):
        SteeringEngine.start(deployment)
    out, err = capfd.readouterr()
    assert f"experts.chat.tuned {'is' if expert == 'w8a16' else 'holds'}" in out + err and reason in out + err
