"""Deployment config: bad configs fail at load, naming the field and the reason."""

from __future__ import annotations

import shutil

import pytest
import yaml
from steering_tools.fixtures import QWEN2_FAMILY, Shape, save_model, train_tokenizer

from steering.config import load_deployment, parse_deployment
from steering.errors import ConfigError, InvalidSteering, UnknownPolicy
from steering.policy import Overrides, Policies


def config_of(family: dict, **changes) -> dict:
    config = {
        "base": family["base"],
        "experts": family["experts"],
        "policies": {"base": {}, "chat": {"alpha": {"chat": 1.0}, "max_alpha": 4.0}},
        "engine": {"dtype": "float32", "max_model_len": 256},
    }
    return {**config, **changes}


def write(tmp_path, config: dict):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_good_config_loads(llama_family, tmp_path):
    deployment = load_deployment(write(tmp_path, config_of(llama_family)))
    assert deployment.pair_names == ("chat", "code")
    assert deployment.policies["chat"].alpha == {"chat": 1.0}
    assert deployment.engine.engine_kwargs()["max_model_len"] == 256


def test_relative_paths_are_relative_to_the_yaml_file(llama_family, tmp_path):
    root = tmp_path / "family"
    shutil.copytree(llama_family["base"].rsplit("/", 1)[0], root)
    config = config_of(
        llama_family,
        base="base",
        experts={"chat": {"tuned": "chat-tuned", "untuned": "chat-untuned"}},
    )
    deployment = load_deployment(write(root, config))
    assert deployment.base == str(root / "base")
    assert deployment.experts["chat"].untuned == str(root / "chat-untuned")


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"policies": {"p": {"alpha": {"poetry": 1.0}}}}, "policies.p.alpha.poetry", "unknown expert pair"),
        ({"policies": {"p": {"alpha": {"chat": float("nan")}}}}, "policies.p.alpha.chat", "finite"),
        ({"policies": {"p": {"alpha": {"chat": float("inf")}}}}, "policies.p.alpha.chat", "finite"),
        ({"policies": {"p": {"max_alpha": -1}}}, "policies.p.max_alpha", "greater than or equal to 0"),
        ({"policies": {"p": {"alhpa": {"chat": 1}}}}, "policies.p.alhpa", "Extra inputs"),
        ({"policies": {}}, "policies", "at least 1"),
        ({"engine": {"max_model_len": 0}}, "engine.max_model_len", "greater than 0"),
        ({"engine": {"not_an_option": 1}}, "engine.not_an_option", "not a vLLM engine option"),
        ({"engine": {"hf_overrides": {}}}, "engine.hf_overrides", "set by the steering service"),
        # Any engine option of the wrong type, checked against vLLM's own annotation at load.
        ({"engine": {"max_num_seqs": "many"}}, "engine.max_num_seqs", "valid integer, unable to parse string as an integer (got 'many')"),
        ({"engine": {"enable_prefix_caching": "sometimes"}}, "engine.enable_prefix_caching", "valid boolean"),
        ({"engine": {"compilation_config": {"level": 0}}}, "engine.compilation_config.level", "Unexpected keyword"),
        ({"experts": {"bad.name": {"tuned": "a", "untuned": "b"}}}, "experts.bad.name", "pattern"),
        ({"extra": 1}, "extra", "Extra inputs"),
        ({"tool_call_parser": "hermez"}, "tool_call_parser", "vLLM has no tool parser 'hermez'"),
        ({"tool_strict_level": "always"}, "tool_strict_level", "'auto', 'function' or 'parameter'"),
        ({"reasoning_parser": "qwen4"}, "reasoning_parser", "vLLM has no reasoning parser 'qwen4'"),
        ({"engine": {"reasoning_parser": "qwen3"}}, "engine.reasoning_parser", "top-level reasoning_parser"),
    ],
)
def test_schema_errors_name_the_field(llama_family, change, field, reason):
    with pytest.raises(ConfigError) as caught:
        parse_deployment(config_of(llama_family, **change))
    assert caught.value.field.startswith(field.split(".bad")[0])
    assert reason in str(caught.value)


def test_engine_options_of_the_right_type_pass_through(llama_family):
    engine = {"max_num_seqs": 4, "enable_prefix_caching": True, "compilation_config": {"mode": 0}, "block_size": 32}
    deployment = parse_deployment(config_of(llama_family, engine=engine))
    assert deployment.engine.engine_kwargs() | engine == deployment.engine.engine_kwargs()


def test_vllm_names_the_engine_by_the_base_folder_not_its_path(llama_family):
    from steering.engine import engine_args

    deployment = parse_deployment(config_of(llama_family))
    assert engine_args(deployment).served_model_name == "base" == llama_family["base"].rsplit("/", 1)[1]
    named = parse_deployment(config_of(llama_family, engine={"served_model_name": "prod-base"}))
    assert engine_args(named).served_model_name == "prod-base"


def test_a_reasoning_parser_the_base_tokenizer_cannot_serve_is_refused_before_the_engine(llama_family, tmp_path):
    """deepseek_r1 looks its markers up as tokens; the fixture tokenizer has none."""
    with pytest.raises(ConfigError) as caught:
        load_deployment(write(tmp_path, config_of(llama_family, reasoning_parser="deepseek_r1")))
    assert caught.value.field == "reasoning_parser" and "could not locate think start/end tokens" in str(caught.value)


def test_missing_checkpoint_names_the_field(llama_family, tmp_path):
    experts = {**llama_family["experts"], "chat": {"tuned": str(tmp_path / "nowhere"), "untuned": llama_family["base"]}}
    with pytest.raises(ConfigError) as caught:
        load_deployment(write(tmp_path, config_of(llama_family, experts=experts)))
    assert caught.value.field == "experts.chat.tuned"
    assert "does not exist" in caught.value.reason


def test_not_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_deployment(path)


def test_a_tokenizer_mismatch_is_refused(llama_family, tmp_path):
    other = train_tokenizer(vocab_size=300, lowercase_only=True)
    path = tmp_path / "foreign"
    save_model(Shape("llama", hidden=64, heads=2, kv_heads=1), other, path, seed=5)
    experts = {"chat": {"tuned": str(path), "untuned": llama_family["experts"]["chat"]["untuned"]}}
    with pytest.raises(ConfigError) as caught:
        load_deployment(write(tmp_path, config_of(llama_family, experts=experts)))
    assert caught.value.field == "experts.chat.tuned"
    assert "tokenizer differs from the base's" in caught.value.reason


def test_padded_expert_vocabulary_is_accepted(qwen2_family, tmp_path):
    assert QWEN2_FAMILY.experts["chat"].vocab_pad > 0
    config = config_of(qwen2_family, policies={"chat": {"alpha": {"chat": 1.0}}})
    assert load_deployment(write(tmp_path, config)).pair_names == ("chat",)


def test_alpha_overrides_stay_within_bounds(llama_family, tokenizer):
    policies = Policies.build(parse_deployment(config_of(llama_family)), tokenizer.encode)
    chat = policies["chat"]

    def alpha(policy, override):
        return policy.resolve(Overrides(alpha=override)).alpha

    assert chat.resolve().alpha == {"chat": 1.0}
    assert chat.resolve().alpha_row == (1.0, 0.0), "one alpha per pair, in the deployment's pair order"
    assert alpha(chat, {"chat": -4.0, "code": 2}) == {"chat": -4.0, "code": 2.0}
    with pytest.raises(InvalidSteering, match="beyond this policy's max_alpha"):
        alpha(chat, {"chat": 4.5})
    with pytest.raises(InvalidSteering, match="unknown expert pair"):
        alpha(chat, {"poetry": 1.0})
    with pytest.raises(InvalidSteering, match="finite"):
        alpha(chat, {"chat": float("inf")})
    with pytest.raises(InvalidSteering, match="does not allow alpha overrides"):
        alpha(policies["base"], {"chat": 1.0})
    with pytest.raises(UnknownPolicy):
        policies["nope"]
