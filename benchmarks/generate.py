"""Batched vs one-prompt-at-a-time generation with the transformers backend, same prompts, same process.

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
"""

from __future__ import annotations

import argparse
import time

import torch

from mpo_core.generation.responses import generate_responses
from mpo_core.generation.transformers_backend import TransformersBackend
from mpo_core.plumbing.config import GenerateConfig, ModelConfig
from mpo_core.plumbing.seed import load_seed_prompts

SMOKE = {"prompts": 2, "batch_size": 2, "max_new_tokens": 4}


def timed_generation(
    backend: TransformersBackend, model_cfg: ModelConfig, gen_cfg: GenerateConfig, prompts: list[dict],
    max_new_tokens: int,
) -> tuple[float, float, float]:
    """(samples/s, new tokens/s, seconds) of greedy generation for ``prompts``."""
    started = time.perf_counter()
    rows = generate_responses(
        model_cfg, gen_cfg, prompts, num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, backend=backend
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(backend.tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows)
    return len(rows) / seconds, tokens / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--langs", default="en")
    parser.add_argument("--model", default=ModelConfig().name_or_path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(name_or_path=args.model, device=args.device, dtype="float32")
    langs = None if args.langs == "all" else set(args.langs.split(","))
    seed = [
        r for r in load_seed_prompts()
        if r["harmful"] and r["split"] == "train" and (langs is None or r["lang"] in langs)
    ]
    prompts = seed[:: max(1, len(seed) // args.prompts)][: args.prompts]  # spread over the seed set
    backend = TransformersBackend(model_cfg, batch_size=args.batch_size)
    gen_cfg = GenerateConfig(batch_size=args.batch_size)
    timed_generation(backend, model_cfg, gen_cfg, prompts[:2], 4)

    backend.batch_size = args.batch_size
    batched = timed_generation(backend, model_cfg, gen_cfg, prompts, args.max_new_tokens)
    backend.batch_size = 1
    sequential = timed_generation(backend, model_cfg, gen_cfg, prompts, args.max_new_tokens)

    print(f"prompts={len(prompts)} langs={args.langs} max_new_tokens={args.max_new_tokens} greedy "
          f"model={args.model} threads={torch.get_num_threads()}")
    print(f"batched(batch_size={args.batch_size}): {batched[0]:.2f} samples/s, {batched[1]:.1f} tokens/s, "
          f"{batched[2]:.1f} s")
    print(f"one-at-a-time: {sequential[0]:.2f} samples/s, {sequential[1]:.1f} tokens/s, {sequential[2]:.1f} s")
    print(f"generate_speedup_batched={batched[0] / sequential[0]:.2f}")


if __name__ == "__main__":
    main()
