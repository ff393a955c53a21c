"""The alpha arithmetic, the link, and the processors' per-request bookkeeping, without an engine.

End-to-end coverage of the V1 class is in test_proxy_tuning.py; the V2 class cannot run on a
CPU (Model Runner V2 needs Triton), so its row mapping is checked here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from steering import processors
from steering.processors import AlphaLogitsProcessor, AlphaLogitsProcessorV2
from steering.spec import CompositeSpec, ExpertPairSpec
from steering.steer import ALPHA_KEY, SteeringLink, apply_alpha

SPEC = CompositeSpec((ExpertPairSpec("chat", "t", "u"), ExpertPairSpec("code", "t2", "u2")))
HF_CONFIG = SimpleNamespace(**SPEC.hf_overrides())
VLLM_CONFIG = SimpleNamespace(
    model_config=SimpleNamespace(hf_config=HF_CONFIG), scheduler_config=SimpleNamespace(max_num_seqs=8)
)


@pytest.fixture(autouse=True)
def link(monkeypatch) -> SteeringLink:
    """A fresh per-process link for each test (processors attach themselves to it)."""
    fresh = SteeringLink()
    monkeypatch.setattr(processors, "LINK", fresh)
    return fresh


def params(chat: float = 0.0, code: float = 0.0) -> SamplingParams:
    """What `SteeringEngine` sends: one alpha per pair, in the spec's pair order."""
    return SamplingParams(extra_args={ALPHA_KEY: [chat, code]})


def test_apply_alpha_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    alpha = torch.tensor([[2.0, 0.0], [0.5, -1.0]])
    deltas = [torch.tensor([[1.0, -1.0, 0.0], [2.0, 2.0, 2.0]]), torch.tensor([[9.0, 9.0, 9.0], [1.0, 0.0, -1.0]])]
    out = apply_alpha(logits, alpha, deltas)
    # row 0: [1,2,3] + 2*[1,-1,0] + 0*[9,9,9]; row 1: 0.5*[2,2,2] - 1*[1,0,-1]
    assert out.tolist() == [[3.0, 0.0, 3.0], [0.0, 1.0, 2.0]]


def test_v1_processor_follows_batch_updates():
    processor = AlphaLogitsProcessor(VLLM_CONFIG, torch.device("cpu"), False)
    processor.update_state(BatchUpdate(3, [], [(0, params(chat=1.0), [], []), (1, params(code=2.0), [], []),
                                              (2, SamplingParams(), [], [])], []))
    assert processor.alpha[:3].tolist() == [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
    # request 0 finishes; a new one takes slot 0; 1 and 2 swap; then 2 moves down to 3.
    processor.update_state(BatchUpdate(3, [0], [(0, params(chat=-1.0, code=0.5), [], [])],
                                       [(1, 2, MoveDirectionality.SWAP)]))
    assert processor.alpha[:3].tolist() == [[-1.0, 0.5], [0.0, 0.0], [0.0, 2.0]]
    processor.update_state(BatchUpdate(4, [], [], [(2, 3, MoveDirectionality.UNIDIRECTIONAL)]))
    assert processor.alpha[:4].tolist() == [[-1.0, 0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]]
    processor.update_state(BatchUpdate(1, [3], [], []))
    assert processor.alpha[3].tolist() == [0.0, 0.0]


def test_v1_compute_logits_steers_with_the_processors_table(link):
    processor = AlphaLogitsProcessor(VLLM_CONFIG, torch.device("cpu"), False)
    processor.update_state(BatchUpdate(2, [], [(0, params(chat=2.0), [], []), (1, params(code=-1.0), [], [])], []))
    deltas = list(torch.arange(12, dtype=torch.float32).reshape(2, 2, 3))  # P=2 of [N=2, V=3]
    out = link.steer(torch.zeros(2, 3), deltas)
    assert out.tolist() == [(2 * deltas[0][0]).tolist(), (-deltas[1][1]).tolist()]
    assert processor.apply(out) is out, "the sampler-side apply must not steer twice"


def test_without_a_processor_nothing_is_sampled_unsteered(link):
    with pytest.raises(RuntimeError, match="refusing to sample unsteered"):
        link.steer(torch.zeros(2, 3), [torch.ones(2, 3)])


def test_v2_deltas_are_taken_once_and_must_match(link):
    AlphaLogitsProcessorV2(VLLM_CONFIG, SimpleNamespace(max_num_reqs=4, device=torch.device("cpu")))
    base = torch.zeros(2, 5)
    assert link.steer(base, [torch.ones(3, 5), torch.ones(3, 5)]) is base
    with pytest.raises(RuntimeError, match="want 2 rows, got 3 rows"):
        link.take_deltas(2)
    with pytest.raises(RuntimeError, match="got none"):
        link.take_deltas(2)


def test_v2_processor_maps_rows_to_request_slots(link):
    req_states = SimpleNamespace(max_num_reqs=4, device=torch.device("cpu"))
    processor = AlphaLogitsProcessorV2(VLLM_CONFIG, req_states)
    assert processor.add_request(3, params(chat=1.0)) is True
    assert processor.add_request(1, SamplingParams()) is False
    link.steer(torch.zeros(2, 3), [torch.ones(2, 3), torch.ones(2, 3)])
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([1, 3]))  # row 0 -> slot 1, row 1 -> slot 3
    out = processor.apply(torch.zeros(2, 3), ctx)
    assert out.tolist() == [[0.0] * 3, [1.0] * 3]


@pytest.mark.parametrize("bad", [{"chat": 1.0}, ["1", 0.0], [True, 0.0], 1.0])
def test_admission_refuses_a_malformed_alpha_row(bad):
    with pytest.raises(ValueError):
        AlphaLogitsProcessor.validate_params(SamplingParams(extra_args={ALPHA_KEY: bad}))


def test_a_row_of_the_wrong_length_fails_closed():
    processor = AlphaLogitsProcessor(VLLM_CONFIG, torch.device("cpu"), False)
    with pytest.raises(ValueError, match="has 1 alphas; this engine has 2 expert pairs"):
        processor.update_state(BatchUpdate(1, [], [(0, SamplingParams(extra_args={ALPHA_KEY: [1.0]}), [], [])], []))
