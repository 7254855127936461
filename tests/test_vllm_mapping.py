"""The vLLM backend's mapping, offline, against a fake engine (vLLM itself needs a CUDA machine and cannot
travel to the borrowed one): engine arguments, prompts and chat template, SamplingParams, outputs."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from mpo_core.generation.backend import Completion, SamplingSettings, content_seeds
from mpo_core.generation.vllm_backend import VLLMBackend
from mpo_core.plumbing.config import ModelConfig


@dataclass
class FakeSamplingParams:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass
class FakeEngine:
    """Records what the backend asks of ``vllm.LLM`` and answers two samples per prompt."""

    model: str
    revision: str | None
    trust_remote_code: bool
    dtype: str
    seed: int
    calls: list = field(default_factory=list)

    def chat(self, conversations, params, add_generation_prompt, chat_template):
        self.calls.append(("chat", conversations, params, add_generation_prompt, chat_template))
        return [self._answer(i) for i in range(len(conversations))]

    def generate(self, prompts, params):
        self.calls.append(("generate", prompts, params))
        return [self._answer(i) for i in range(len(prompts))]

    def get_tokenizer(self):
        return lambda text, add_special_tokens: {"input_ids": [len(w) for w in text.split()] + [int(add_special_tokens)]}

    @staticmethod
    def _answer(i):
        sample = types.SimpleNamespace
        return sample(outputs=[sample(text=f"  answer {i} ", finish_reason="stop"), sample(text="cut", finish_reason="length")])


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeEngine, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)


def test_vllm_backend_maps_prompts_sampling_and_outputs(fake_vllm):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    backend = VLLMBackend(
        ModelConfig(name_or_path="org/model", revision="abc", dtype="bfloat16", chat_template=template), seed=7
    )
    engine = backend.llm
    assert (engine.model, engine.revision, engine.dtype, engine.seed, engine.trust_remote_code) == (
        "org/model", "abc", "bfloat16", 7, False,
    )
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]]
    settings = SamplingSettings(num_samples=2, max_new_tokens=9, temperature=0.8, top_p=0.9, seed=3)
    sampled = backend.chat(conversations, settings, seeds=[11, 12])
    kind, sent, params, generation_prompt, chat_template = engine.calls[-1]
    assert kind == "chat" and sent == conversations and generation_prompt and chat_template == template
    assert params == [FakeSamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=9, seed=seed) for seed in (11, 12)]
    assert sampled[1] == [Completion("answer 1", "stop"), Completion("cut", "length")]

    backend.complete(["ab cde"], SamplingSettings(max_new_tokens=4))
    kind, prompts, params = engine.calls[-1]
    assert prompts == [{"prompt_token_ids": [2, 3, 0]}]  # tokenised without special tokens
    seed = content_seeds(0, ["ab cde"])[0]  # no identity given: the request's content is its identity
    assert params == [FakeSamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=seed)]  # greedy
