"""`steer complete`, `steer check` and `steer fixtures` as a newcomer runs them: the installed script, a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from steering_tools.fixtures import write_deployment

STEER = str(Path(sys.executable).parent / "steer")


def steer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([STEER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deploy_yaml(qwen2_family, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "deploy.yaml"
    return write_deployment(qwen2_family, path, engine={"enforce_eager": True, "max_model_len": 256})


def test_complete_json_matches_the_reference(deploy_yaml, qwen2_reference, tokenizer):
    prompt = "the server decodes each token"
    ids = tokenizer.encode(prompt)
    result = steer(
        "complete", "--config", str(deploy_yaml), "--policy", "base", "--policy", "chat",
        "--max-tokens", "16", "--json", prompt,
    )
    assert result.returncode == 0, result.stderr
    base, chat = [json.loads(line) for line in result.stdout.splitlines()]
    assert (base["policy"], base["alpha"]) == ("base", {})
    assert (chat["policy"], chat["alpha"]) == ("chat", {"chat": 1.0})
    assert base["token_ids"] == qwen2_reference.generate([ids], [{}], max_tokens=16)[0]
    assert chat["token_ids"] == qwen2_reference.generate([ids], [{"chat": 1.0}], max_tokens=16)[0]
    assert chat["token_ids"] != base["token_ids"]
    assert chat["text"] == tokenizer.decode(chat["token_ids"], skip_special_tokens=True)


def test_complete_applies_an_alpha_override(deploy_yaml, qwen2_reference, tokenizer):
    prompt = "a river follows"
    result = steer(
        "complete", "--config", str(deploy_yaml), "--policy", "chat", "--alpha", "chat=-2.5",
        "--max-tokens", "12", "--json", prompt,
    )
    assert result.returncode == 0, result.stderr
    (chat,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert chat["alpha"] == {"chat": -2.5}
    assert chat["token_ids"] == qwen2_reference.generate([tokenizer.encode(prompt)], [{"chat": -2.5}], max_tokens=12)[0]


def test_complete_refuses_an_out_of_bounds_alpha_before_starting_an_engine(deploy_yaml):
    result = steer("complete", "--config", str(deploy_yaml), "--policy", "chat", "--alpha", "chat=9", "hi", timeout=120)
    assert result.returncode == 2
    assert "beyond this policy's max_alpha 4.0" in result.stderr


def test_complete_names_the_bad_config_field(deploy_yaml, tmp_path):
    config = yaml.safe_load(deploy_yaml.read_text())
    config["policies"]["chat"]["alpha"] = {"poetry": 1.0}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = steer("complete", "--config", str(bad), "--policy", "chat", "hi", timeout=120)
    assert result.returncode == 2
    assert "policies.chat.alpha.poetry: unknown expert pair" in result.stderr


def test_complete_decides_and_abstains_as_the_server_would(deploy_yaml, qwen2_reference, tokenizer, tmp_path):
    """Decision and abstention policies answer through the server's own planning, not as plain
    generation: the Bayes action over the reference's label probabilities, and the abstention
    message below the threshold."""
    prompt = "a river follows"
    ids = tokenizer.encode(prompt)
    alpha = {"chat": 1.0}
    first = qwen2_reference.next_token_logprobs([ids], [alpha])[0]
    answer = qwen2_reference.generate([ids], [alpha], max_tokens=6)[0]
    p_first = float(first[answer[0]].exp())
    assert p_first < 0.99, "the abstaining policy's threshold must sit above the first token's probability"
    config = yaml.safe_load(deploy_yaml.read_text())
    config["policies"] |= {
        "triage": {"alpha": alpha, "decision": {"labels": ["yes", "no"], "cost_fp": 10, "cost_fn": 1}},
        "sure": {"alpha": alpha, "abstain": {"score": "first_prob", "threshold": 0.0}},
        "unsure": {"alpha": alpha, "abstain": {"score": "first_prob", "threshold": (1 + p_first) / 2,
                                               "message": "Not sure."}},
    }
    path = tmp_path / "decide.yaml"
    path.write_text(yaml.safe_dump(config))
    result = steer("complete", "--config", str(path), "--policy", "triage", "--policy", "sure", "--policy", "unsure",
                   "--max-tokens", "6", "--json", prompt)
    assert result.returncode == 0, result.stderr
    triage, sure, unsure = [json.loads(line) for line in result.stdout.splitlines()]

    labels = [tokenizer.encode(label, add_special_tokens=False)[0] for label in ("yes", "no")]
    p_yes = float(first[labels].softmax(dim=0)[0])
    decision = triage["steering"]["decision"]
    assert decision["probabilities"]["yes"] == pytest.approx(p_yes, abs=1e-4)
    action = "yes" if p_yes >= 10 / 11 else "no"  # a false yes costs 10, a false no 1
    assert decision["action"] == triage["text"] == action

    assert sure["token_ids"] == answer and sure["steering"]["abstained"] is False
    assert sure["steering"]["abstention"]["raw"] == pytest.approx(p_first, abs=1e-4)
    assert (unsure["text"], unsure["steering"]["abstained"]) == ("Not sure.", True)


def test_complete_names_the_flag_a_claim_check_needs_before_starting_an_engine(deploy_yaml, tmp_path):
    config = yaml.safe_load(deploy_yaml.read_text())
    config["policies"]["check"] = {"alpha": {"chat": 1.0},
                                   "decision": {"claim": True, "labels": ["yes", "no"], "cost_fp": 10, "cost_fn": 1}}
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(config))
    result = steer("complete", "--config", str(path), "--policy", "check", "hi", timeout=120)
    assert result.returncode == 2
    assert "this policy checks a claim" in result.stderr and "(--claim)" in result.stderr


def test_fixtures_writes_a_loadable_family(tmp_path):
    from steering.config import load_deployment

    result = steer("fixtures", "--out", str(tmp_path / "family"), timeout=300)
    assert result.returncode == 0, result.stderr
    deployment = load_deployment(tmp_path / "family" / "deploy.yaml")
    assert set(deployment.policies) == {"base", "chat", "code"}


def test_check_passes_a_config_serve_would_start_and_names_the_field_of_one_it_would_refuse(deploy_yaml, tmp_path):
    from steering.config import digest, load_deployment

    result = steer("check", "--config", str(deploy_yaml), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{deploy_yaml}: ok, config {digest(load_deployment(deploy_yaml))}\n")
    assert "  policies: base, chat" in result.stdout
    kv_cache = float(result.stdout.split("KV cache: ")[1].split(" GiB")[0])
    assert kv_cache > 0, "sized in bytes from the models on CPU"
    config = yaml.safe_load(deploy_yaml.read_text())
    config["engine"]["max_model_len"] = 2**20  # valid YAML and schema; vLLM's own config check refuses it
    bad = tmp_path / "deploy.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = steer("check", "--config", str(bad), timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("steer: engine.max_model_len: vLLM refused it: ")


def test_bench_quality_refuses_a_bad_reference_before_building_anything(tmp_path):
    single = tmp_path / "quality.json"
    single.write_text('{"accuracy": {"base": 0.0}}')  # one family's report, not one over seeds
    result = steer("bench", "quality", "--seeds", "7", "--compare", str(single), timeout=120)
    assert result.returncode == 2
    assert f"--compare: {single} is not a report over seeds" in result.stderr
    assert "seed 7" not in result.stdout, "refused before the family of seed 7 was built"
