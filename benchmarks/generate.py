"""Generation speed: transformers batched vs one prompt at a time, then vLLM against transformers, same prompts.

Loads the model once, warms it up, then generates greedily (same settings both ways) for the same seed
prompts: once in batches of ``--batch-size`` and once one prompt per ``generate`` call. Prints samples/s
and new tokens/s of each and, on the last line, ``generate_speedup_batched=<batched / sequential>``.

    python benchmarks/generate.py [--prompts 16] [--batch-size 16] [--max-new-tokens 32] [--langs en]
                                  [--model ...]

``--langs`` picks the seed languages the prompts come from (comma-separated, default ``en``, the dominant
language); ``--langs all`` mixes all seven, whose prompt lengths differ up to 5x (Bengali is long for this
tokenizer), so one batch pads the short ones. On a CPU shared with other busy processes, ``--threads 1``
(or ``OMP_NUM_THREADS=1``) avoids thread oversubscription, which slowed both modes about 5-10x on the
2-core build machine. ``--smoke`` (what CI runs, ``tests/test_benchmarks.py``): 2 prompts, batches of 2, 4 new
tokens; flags given beside it still win.

Then vLLM (``make setup-vllm-cpu`` on CPU) on the same prompts and settings: its engine start (``generate.vllm``
defaults: eager, float32 as ``--dtype``), a warm-up, the same generation, and on the last line
``vllm_over_transformers=<vLLM tokens/s / transformers batched tokens/s> vllm_startup_s=<engine start>``; the
line before gives the ratio with the engine's start counted. ``--samples N --temperature T`` compare sampling
(generate's own settings) instead of greedy decoding. Where vLLM cannot be imported both figures are ``nan``
and the reason is printed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from mpo_core.generation.backend import GenerationBackend
from mpo_core.generation.responses import generate_responses
from mpo_core.generation.transformers_backend import TransformersBackend
from mpo_core.plumbing.config import GenerateConfig, ModelConfig
from mpo_core.plumbing.seed import load_seed_prompts

SMOKE = {"prompts": 2, "batch_size": 2, "max_new_tokens": 4}


def timed_generation(
    backend: GenerationBackend, model_cfg: ModelConfig, gen_cfg: GenerateConfig, prompts: list[dict],
    max_new_tokens: int, tokenizer: Any,
) -> tuple[float, float, float]:
    """(samples/s, new tokens/s, seconds) of generation with ``gen_cfg``'s sampling for ``prompts``; tokens
    counted with ``tokenizer`` for every backend."""
    started = time.perf_counter()
    rows = generate_responses(model_cfg, gen_cfg, prompts, max_new_tokens=max_new_tokens, backend=backend)
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows)
    return len(rows) / seconds, tokens / seconds, seconds


def vllm_figures(
    model_cfg: ModelConfig, gen_cfg: GenerateConfig, prompts: list[dict], max_new_tokens: int, tokenizer: Any,
) -> tuple[float, tuple[float, float, float]] | str:
    """(engine start seconds, timed generation) with vLLM, or why it could not run."""
    from mpo_core.generation.vllm_backend import VLLMBackend, vllm_engine_scope
    from mpo_core.plumbing.errors import ModelLoadError

    try:
        backend = VLLMBackend(model_cfg, gen_cfg.vllm, seed=gen_cfg.seed)
    except ModelLoadError as err:
        return str(err)
    with vllm_engine_scope():
        started = time.perf_counter()
        backend.start()
        startup_s = time.perf_counter() - started
        timed_generation(backend, model_cfg, gen_cfg, prompts[:2], 4, tokenizer)  # warm-up
        return startup_s, timed_generation(backend, model_cfg, gen_cfg, prompts, max_new_tokens, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt (needs --temperature > 0)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--langs", default="en")
    parser.add_argument("--model", default=ModelConfig().name_or_path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(name_or_path=args.model, device=args.device, dtype=args.dtype)
    langs = None if args.langs == "all" else set(args.langs.split(","))
    seed = [
        r for r in load_seed_prompts()
        if r["harmful"] and r["split"] == "train" and (langs is None or r["lang"] in langs)
    ]
    prompts = seed[:: max(1, len(seed) // args.prompts)][: args.prompts]  # spread over the seed set
    backend = TransformersBackend(model_cfg, batch_size=args.batch_size)
    tokenizer = backend.tokenizer
    gen_cfg = GenerateConfig(batch_size=args.batch_size, num_samples=args.samples, temperature=args.temperature)
    timed_generation(backend, model_cfg, gen_cfg, prompts[:2], 4, tokenizer)

    backend.batch_size = args.batch_size
    batched = timed_generation(backend, model_cfg, gen_cfg, prompts, args.max_new_tokens, tokenizer)
    backend.batch_size = 1
    sequential = timed_generation(backend, model_cfg, gen_cfg, prompts, args.max_new_tokens, tokenizer)
    del backend

    sampling = "greedy" if gen_cfg.num_samples == 1 and gen_cfg.temperature == 0.0 else (
        f"{gen_cfg.num_samples} samples at temperature {gen_cfg.temperature}")
    print(f"prompts={len(prompts)} langs={args.langs} max_new_tokens={args.max_new_tokens} {sampling} "
          f"model={args.model} dtype={args.dtype} threads={torch.get_num_threads()}")
    print(f"batched(batch_size={args.batch_size}): {batched[0]:.2f} samples/s, {batched[1]:.1f} tokens/s, "
          f"{batched[2]:.1f} s")
    print(f"one-at-a-time: {sequential[0]:.2f} samples/s, {sequential[1]:.1f} tokens/s, {sequential[2]:.1f} s")
    print(f"generate_speedup_batched={batched[0] / sequential[0]:.2f}")

    figures = vllm_figures(model_cfg, gen_cfg, prompts, args.max_new_tokens, tokenizer)
    if isinstance(figures, str):
        print(f"vllm: not run ({figures})")
        print("vllm_over_transformers=nan vllm_startup_s=nan")
        return
    startup_s, by_vllm = figures
    with_startup = by_vllm[2] + startup_s
    print(f"vllm: {by_vllm[0]:.2f} samples/s, {by_vllm[1]:.1f} tokens/s, {by_vllm[2]:.1f} s; engine start "
          f"{startup_s:.1f} s; with the start counted {batched[2] / with_startup:.2f}x transformers batched "
          f"({with_startup:.1f} s against {batched[2]:.1f} s)")
    print(f"vllm_over_transformers={by_vllm[1] / batched[1]:.2f} vllm_startup_s={startup_s:.1f}")


if __name__ == "__main__":
    main()
