"""The judge a config names: :func:`get_judge`."""

from __future__ import annotations

from mpo_core.generation.responses import get_backend
from mpo_core.judges.base import Judge
from mpo_core.judges.guards import DEFAULT_GUARD_MODELS, LLMGuardJudge
from mpo_core.judges.patterns import RefusalPatternJudge
from mpo_core.plumbing.config import GenerateConfig, LabelConfig, ModelConfig, VLLMConfig


def get_judge(
    label_cfg: LabelConfig, model_cfg: ModelConfig | None = None, engine_cfg: VLLMConfig | None = None
) -> Judge:
    """The judge named by ``label_cfg.judge``; LLM judges load ``label_cfg.model`` (or the official id)
    on ``model_cfg``'s device and dtype with ``label_cfg.backend`` (vllm: the engine settings ``engine_cfg``,
    the recipe's ``generate.vllm``)."""
    if label_cfg.judge == "refusal_patterns":
        return RefusalPatternJudge(label_cfg.patterns)
    base = model_cfg or ModelConfig()
    guard_cfg = base.model_copy(
        update={"name_or_path": label_cfg.model or DEFAULT_GUARD_MODELS[label_cfg.judge], "revision": None}
    )
    gen_cfg = GenerateConfig(backend=label_cfg.backend, batch_size=label_cfg.batch_size, vllm=engine_cfg or VLLMConfig())
    backend = get_backend(guard_cfg, gen_cfg)
    return LLMGuardJudge(label_cfg.judge, backend, batch_size=label_cfg.batch_size)
