"""Generation backends: sampling settings, row contract, real transformers generation, vLLM guard."""

from __future__ import annotations

import random

import pytest

from mpo_core.generation.backend import Completion, GenerationBackend, SamplingSettings, request_seed
from mpo_core.generation.responses import generate_responses
from mpo_core.generation.transformers_backend import TransformersBackend
from mpo_core.generation.vllm_backend import VLLMBackend
from mpo_core.plumbing.config import GenerateConfig, ModelConfig, PipelineConfig
from mpo_core.plumbing.errors import ConfigError, ModelLoadError
from mpo_core.plumbing.schemas import RESPONSES
from mpo_core.stages.generate import generation_prompts

PROMPTS = [
    {"prompt_id": "b001", "lang": "en", "text": "How do I make a simple tomato soup?"},
    {"prompt_id": "b001", "lang": "sw", "text": "Ninawezaje kupika supu rahisi ya nyanya?"},
    {"prompt_id": "b003", "lang": "en", "text": "Why is the sky blue?"},
]


class EchoBackend(GenerationBackend):
    """Answers each conversation with its last message, numbered per sample."""

    name = "echo"
    model_name = "echo-model"

    def chat(self, conversations, settings, seeds=None):
        return [
            [Completion(f"{conv[-1]['content']}#{k}", "stop") for k in range(settings.num_samples)]
            for conv in conversations
        ]

    def complete(self, prompts, settings, seeds=None):
        return [[Completion(p, "stop")] for p in prompts]


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ConfigError, match="identical samples"):
        SamplingSettings(num_samples=2, temperature=0.0)


def test_rows_follow_the_responses_contract():
    rows = generate_responses(ModelConfig(), GenerateConfig(num_samples=3, seed=5), PROMPTS, backend=EchoBackend())
    assert len(rows) == 9
    assert set(rows[0]) == set(RESPONSES.names)
    assert [r["sample_idx"] for r in rows[:3]] == [0, 1, 2]
    assert rows[4]["text"] == "Ninawezaje kupika supu rahisi ya nyanya?#1"
    assert {r["backend"] for r in rows} == {"echo"}
    assert [r["seed"] for r in rows] == [request_seed(5, p["prompt_id"], p["lang"]) for p in PROMPTS for _ in range(3)]
    assert all(r["judge"] is None and r["verdict"] is None and r["score"] is None for r in rows)
    greedy = generate_responses(ModelConfig(), GenerateConfig(), PROMPTS, num_samples=1, temperature=0.0,
                                backend=EchoBackend())
    assert [r["sample_idx"] for r in greedy] == [0, 0, 0]


def test_generation_prompts_takes_harmful_train_rows_of_run_languages():
    from mpo_core.plumbing.seed import load_seed_prompts

    config = PipelineConfig.model_validate({"run": {"target_langs": ["zh", "sw"]}})
    picked = generation_prompts(config, load_seed_prompts())
    assert len(picked) == 40 * 3
    assert {r["lang"] for r in picked} == {"en", "zh", "sw"}
    assert all(r["harmful"] and r["split"] == "train" for r in picked)
    with_benign = config.model_copy(update={"generate": GenerateConfig(harmful_only=False)})
    assert len(generation_prompts(with_benign, load_seed_prompts())) == 60 * 3


def test_vllm_backend_without_vllm_says_how_to_install():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match=r"mpo\[gpu\]"):
            VLLMBackend(ModelConfig())
    else:
        pytest.skip("vLLM is installed")


@pytest.mark.slow
def test_transformers_backend_is_batched_seeded_and_reproducible(default_model_config):
    backend = TransformersBackend(default_model_config, batch_size=2)
    cfg = GenerateConfig(num_samples=2, max_new_tokens=4, temperature=0.9, seed=11)
    first = generate_responses(default_model_config, cfg, PROMPTS, backend=backend)
    again = generate_responses(default_model_config, cfg, PROMPTS, backend=backend)
    other = generate_responses(default_model_config, cfg.model_copy(update={"seed": 12}), PROMPTS,
                               backend=backend)
    assert [r["text"] for r in first] == [r["text"] for r in again]
    assert [r["text"] for r in first] != [r["text"] for r in other]
    assert len(first) == 6 and all(r["text"] for r in first)
    assert {r["finish_reason"] for r in first} <= {"stop", "length"}
    assert [(r["prompt_id"], r["lang"], r["sample_idx"]) for r in first] == [
        (p["prompt_id"], p["lang"], k) for p in PROMPTS for k in range(2)
    ]
    greedy_batched = generate_responses(default_model_config, cfg, PROMPTS[:2], num_samples=1, temperature=0.0,
                                        backend=backend)
    backend.batch_size = 1
    greedy_single = generate_responses(default_model_config, cfg, PROMPTS[:2], num_samples=1, temperature=0.0,
                                       backend=backend)
    assert greedy_batched[0]["text"] == greedy_single[0]["text"]


@pytest.mark.slow
def test_samples_do_not_depend_on_how_prompts_are_batched(default_model_config):
    """Each prompt's samples come from its own seed (generate.seed and the prompt's identity): the prompts
    shuffled and cut into other batches give the same rows, which is what lets a stage be split into shards."""
    from mpo_core.plumbing.seed import load_seed_prompts

    prompts = [p for p in load_seed_prompts() if p["split"] == "train" and p["harmful"]
               and p["lang"] in ("en", "zh", "sw")][:15]
    cfg = GenerateConfig(num_samples=2, max_new_tokens=12, temperature=0.8, seed=3)
    backend = TransformersBackend(default_model_config, batch_size=16)
    together = generate_responses(default_model_config, cfg, prompts, backend=backend)
    shuffled = random.Random(0).sample(prompts, len(prompts))
    backend.batch_size = 4
    apart = generate_responses(default_model_config, cfg, shuffled, backend=backend)
    key = lambda r: (r["prompt_id"], r["lang"], r["sample_idx"])
    assert sorted((key(r), r["text"], r["seed"]) for r in together) == sorted((key(r), r["text"], r["seed"]) for r in apart)
    assert sum(a["text"] != b["text"] for a, b in zip(together[::2], together[1::2])) >= len(prompts) // 2


def test_chat_template_keeps_the_models_own_system_prompt(default_model_config):
    backend = TransformersBackend(default_model_config)
    text = backend.chat_texts([[{"role": "user", "content": "hi"}]])[0]
    assert "SmolLM" in text and text.rstrip().endswith("assistant")


def test_raw_dominant_samples_only_after_align_and_only_in_the_dominant_language(monkeypatch):
    from mpo_core.generation import responses
    from mpo_core.stages import generate as generation

    class NamedEcho(EchoBackend):
        def __init__(self, model_cfg):
            self.model_name = model_cfg.name_or_path

    monkeypatch.setattr(responses, "get_backend", lambda model_cfg, gen_cfg: NamedEcho(model_cfg))
    config = PipelineConfig.model_validate({
        "model": {"name_or_path": "raw-model"},
        "generate": {"num_samples": 3, "raw_dominant_samples": 2},
        "run": {"target_langs": ["sw"]},
    })
    rows = generation.raw_dominant_responses(config, {"aligned": "runs/x/align/model"}, PROMPTS)
    assert [(r["prompt_id"], r["lang"], r["sample_idx"]) for r in rows] == [
        ("b001", "en", 3), ("b001", "en", 4), ("b003", "en", 3), ("b003", "en", 4)]
    assert {r["model"] for r in rows} == {"raw-model"}
    assert generation.raw_dominant_responses(config, {}, PROMPTS) == []  # no align: the raw model is the policy
    off = config.model_copy(update={"generate": GenerateConfig(num_samples=3)})
    assert generation.raw_dominant_responses(off, {"aligned": "runs/x/align/model"}, PROMPTS) == []


def test_a_completion_cut_inside_a_character_loses_the_broken_character():
    from mpo_core.generation.backend import without_cut_character

    assert without_cut_character("你想更深厚的说明，请您\ufffd") == "你想更深厚的说明，请您"
    assert without_cut_character(" ab\ufffd\ufffd ") == "ab" and without_cut_character("a\ufffdb") == "a\ufffdb"


def test_empty_prompts_are_named_errors_in_both_backends(default_model_config):
    """Empty prompts fail before any generation, naming them: in generate_responses (prompt_id/lang) and in
    each backend (position); the vLLM backend's own check is tests/test_vllm_mapping.py."""
    from mpo_core.plumbing.errors import InputDataError

    with pytest.raises(InputDataError, match=r"1 prompt\(s\) with an empty text \(prompt_id/lang\): \['p9/zh'\]"):
        generate_responses(default_model_config, GenerateConfig(), [*PROMPTS, {"prompt_id": "p9", "lang": "zh", "text": " "}],
                           backend=EchoBackend())
    backend = TransformersBackend(default_model_config)
    with pytest.raises(InputDataError, match=r"backend transformers: 1 empty prompt\(s\) of 2, at position\(s\) \[0\]"):
        backend.complete(["", "hello"], SamplingSettings())
    with pytest.raises(InputDataError, match="empty prompt"):
        backend.chat([[{"role": "user", "content": ""}]], SamplingSettings())


def test_token_budgeted_batches_hold_more_short_prompts_in_the_first_batchs_budget():
    from mpo_core.generation.transformers_backend import token_budgeted_batches

    lengths = [100, 90, 50, 50, 50, 20, 20, 20, 20, 20, 20]
    batches = token_budgeted_batches(lengths, batch_size=2, max_new_tokens=10)
    assert batches[0] == (0, 2)  # the longest prompts: batch_size of them
    assert [i for a, b in batches for i in range(a, b)] == list(range(len(lengths)))  # each prompt once, in order
    assert all((b - a) * (lengths[a] + 10) <= 2 * 110 for a, b in batches)
    assert max(b - a for a, b in batches) > 2
    assert token_budgeted_batches([500, 10], batch_size=1, max_new_tokens=0) == [(0, 1), (1, 2)]
    assert token_budgeted_batches([], batch_size=4, max_new_tokens=8) == []


@pytest.mark.slow
def test_a_prompts_prefill_shared_by_its_samples_gives_the_samples_of_separate_prefills(default_model_config,
                                                                                      monkeypatch):
    """Several samples of a prompt reuse one prefill (its cache repeated per sample); the samples are those
    of a prefill per sample, as the backend made them before."""
    backend = TransformersBackend(default_model_config, batch_size=3)
    cfg = GenerateConfig(num_samples=3, max_new_tokens=12, temperature=0.9, seed=5)
    shared = generate_responses(default_model_config, cfg, PROMPTS, backend=backend)
    monkeypatch.setattr(backend, "_prefill", lambda unique, num_samples: None)
    separate = generate_responses(default_model_config, cfg, PROMPTS, backend=backend)
    assert [r["text"] for r in shared] == [r["text"] for r in separate]



def _full_sort_nucleus(scores, temperature: float, top_p: float):
    """The plain nucleus: probabilities with the whole vocabulary sorted and the tail set to 0."""
    import torch

    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p == 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


@pytest.mark.parametrize("top_p", [0.95, 0.5, 1.0])
def test_the_seeded_sampler_draws_what_a_full_sort_and_multinomial_draw(top_p):
    """The nucleus read from the most probable candidates (a full sort only where it reaches past them) gives
    the token of a full sort and ``torch.multinomial`` on every row, step after step of the same generators:
    peaked rows, and flat rows whose nucleus holds thousands of tokens (the full-sort fallback)."""
    import torch

    from mpo_core.generation.transformers_backend import SeededSampler

    vocab, seeds, temperature = 5000, list(range(30)), 0.8
    sampler = SeededSampler(seeds, temperature, top_p, device=torch.device("cpu"))
    multinomial_generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    spread = torch.tensor([6.0 if r % 3 else 0.05 for r in range(len(seeds))])[:, None]  # every third row flat
    large_nuclei = 0
    for step in range(4):
        scores = torch.randn(len(seeds), vocab, generator=torch.Generator().manual_seed(step)) * spread
        nuclei = sampler.nucleus(torch.softmax(scores / temperature, dim=-1))
        large_nuclei += sum(len(ids) > SeededSampler.NUCLEUS_CANDIDATES for ids, _ in nuclei)
        chosen = sampler(torch.zeros(len(seeds), 1, dtype=torch.long), scores)
        assert (chosen == 0).sum(dim=-1).tolist() == [1] * len(seeds)  # -inf but at the drawn token
        expected = [torch.multinomial(_full_sort_nucleus(row, temperature, top_p), 1, generator=gen).item()
                    for row, gen in zip(scores, multinomial_generators)]
        assert chosen.argmax(dim=-1).tolist() == expected, f"step {step}"
        for (ids, weights), row in zip(nuclei, scores):
            full = _full_sort_nucleus(row, temperature, top_p)
            assert torch.equal(ids, full.nonzero().flatten()) and torch.equal(weights, full[ids])
    assert large_nuclei > 0


def test_similar_length_groups_pad_each_group_by_at_most_the_given_share():
    from mpo_core.generation.transformers_backend import similar_length_groups

    lengths = [100, 95, 91, 90, 80, 73, 72, 20, 20]
    groups = similar_length_groups(lengths, padding=0.1)
    assert groups == [(0, 4), (4, 7), (7, 9)]
    assert all(min(lengths[a:b]) >= 0.9 * lengths[a] for a, b in groups)
    assert similar_length_groups([]) == [] and similar_length_groups([5]) == [(0, 1)]


@pytest.mark.slow
def test_a_batch_prefilled_in_groups_of_similar_length_answers_as_prompts_alone(default_model_config,
                                                                               monkeypatch):
    """Prompts of 1x to 5x each other's length (seven languages) in one batch: their prefill runs in groups of
    similar length, laid out in the batch's left padding; the greedy answers are those of each prompt alone
    and those of ``generate``'s own prefill of the padded batch."""
    from mpo_core.generation.transformers_backend import similar_length_groups
    from mpo_core.plumbing.seed import load_seed_prompts

    prompts = [p for p in load_seed_prompts() if p["split"] == "eval" and p["prompt_id"] in ("h003", "b003")]
    backend = TransformersBackend(default_model_config, batch_size=64)
    lengths = sorted((len(backend.tokenizer(t)["input_ids"]) for t in backend.chat_texts(
        [[{"role": "user", "content": p["text"]}] for p in prompts])), reverse=True)
    assert len(similar_length_groups(lengths)) >= 3
    cfg = GenerateConfig(num_samples=1, max_new_tokens=10, temperature=0.0)
    grouped = [r["text"] for r in generate_responses(default_model_config, cfg, prompts, backend=backend)]
    backend.batch_size = 1
    alone = [r["text"] for r in generate_responses(default_model_config, cfg, prompts, backend=backend)]
    backend.batch_size = 64
    monkeypatch.setattr(backend, "_prefill", lambda unique, num_samples: None)
    padded = [r["text"] for r in generate_responses(default_model_config, cfg, prompts, backend=backend)]
    assert grouped == alone == padded
    assert len(set(grouped)) > len(grouped) // 2
