"""Training-step benchmark on the embedded default model and real MPO pairs (../shared/data/mpo_official).

Three variants, same batches (``--pairs-per-step`` real quadruples, ``--max-length`` tokens), same AdamW:

(a) ``precomputed``: MPO as mpo trains — RG^d and the reference's pooled states read from the reference stage's
    values (computed before timing, as the reference stage does once), no reference model in memory, no LM head
    on the dominant side, the LM head only on target response tokens in chunks, each pair's shared prompt run
    once, two backward passes (:func:`mpo_core.method.objective.mpo_backward_step`).
(b) ``online``: MPO as the paper's code does it — a frozen reference model in memory, its forward with full
    logits in every step, full-vocabulary float32 logits for every sequence of the policy, one backward.
(c) ``trl_dpo``: one step of TRL's ``DPOTrainer`` (sigmoid loss) on the target-language side.

Each variant runs in a fresh subprocess. Step time: median over the timed steps (after warm-up). Peak memory:
the kernel's resident-set high-water mark of that subprocess (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its
resident set after imports, before any model is loaded; so weights, optimizer state, activations and logits
all count, and a reference model in memory counts too.

MFU of (a): model FLOPs per step / median step time / measured fp32 matmul peak. Model FLOPs are
``6 * N_body * executed_tokens`` (forward + backward of the backbone without embeddings over the non-padding
tokens (a) actually runs: the four sequences of each pair, each pair's shared prompt counted once, as (a) runs it
once) ``+ 6 * N_head * response_tokens`` (the LM head on the target chosen and rejected response tokens);
attention score FLOPs and the recomputed LM-head chunks are not counted, so the figure is a lower bound. The
FLOPs the same step would cost without prompt sharing are printed beside it. The peak is
the best of several large ``torch.mm`` (fp32) in this same run, with the same thread count.

The machine is shared while this runs: the figures are printed as measured, with the load average.

``--synthetic tiny|1b`` runs the same three variants with no data and no download (what
``scripts/gpu-check.sh`` runs): a Llama-architecture model with random weights (:mod:`mpo_core.method.synthetic`;
``1b`` is Llama-3.2-1B's shape), random token ids, fp32 master weights under bf16 autocast for every variant
(TRL's through ``bf16=True``), on CUDA where present. Peak memory there is ``torch.cuda.max_memory_allocated``
(weights, optimizer state, activations; the online variant's reference model too); MFU is against a bf16
``torch.mm`` peak measured in the same run. The last line is
``gpu_step_ratio=<online / ours> gpu_peak_mem_ratio=<online / ours> gpu_mfu=<ours>``.

``--smoke`` (what CI runs, ``tests/test_benchmarks.py``): the default comparison on the embedded model at
the smallest size, for the code path, not the figures: one pair of at most 160 tokens (TRL drops a pair
whose prompt fills the length; the first, Chinese, takes 128 with the chat template), one timed step, no
warm-up, a 256 x 256 matmul peak; flags given beside it still win.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MPO_SHARED_DATA", ROOT.parent / "shared" / "data"))
VARIANTS = ("precomputed", "online", "trl_dpo")
SMOKE = {"pairs_per_step": 1, "max_length": 160, "steps": 1, "warmup": 0, "matmul_size": 256}


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_batches(args) -> list:
    """``steps`` lists of ``pairs_per_step`` real quadruples (PAIRS rows), the same for every variant."""
    from mpo_core.readers.pairs import load_pairs

    table = load_pairs(SHARED_DATA / "mpo_official" / "llama_mpo_data.json")
    rows = table.to_pylist()
    n = args.pairs_per_step
    total = args.warmup + args.steps
    return [rows[i * n : (i + 1) * n] for i in range(total)]


def model_config():
    from mpo_core.plumbing.config import ModelConfig

    return ModelConfig(device="cpu", dtype="float32")


def synthetic_setup(args):
    """Model, tokenizer and collated batches of the ``--synthetic`` mode, on ``args.device``."""
    from mpo_core.method.synthetic import SIZES, synthetic_causal_lm, synthetic_mpo_batch, synthetic_tokenizer

    size = SIZES[args.synthetic]
    model = synthetic_causal_lm("llama", args.synthetic, device=args.device)
    batches = [
        synthetic_mpo_batch(
            args.pairs_per_step, args.max_length // 4, args.max_length - args.max_length // 4,
            size["vocab_size"], size["hidden_size"], seed=i, device=args.device,
        )
        for i in range(args.warmup + args.steps)
    ]
    return model, synthetic_tokenizer(size["vocab_size"]), batches


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(args) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch

    if args.synthetic:
        return run_synthetic_variant(args)

    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.plumbing.artifacts import to_table

    base_rss = rss_mib()
    batches = load_batches(args)
    tok = load_tokenizer(model_config())
    model = load_model(model_config())
    step_times: list[float] = []
    tokens = {"real": 0, "executed": 0, "response": 0}

    if args.variant == "trl_dpo":
        step_times = run_trl_dpo(args, model, tok, batches)
    else:
        from mpo_core.method.objective import mpo_backward_step, paper_mpo_loss, side
        from mpo_core.method.packed import pair_prefix_lengths
        from mpo_core.method.reference import reference_outputs
        from mpo_core.training.examples import MPOCollator, build_examples
        from mpo_core.training.fit import disable_dropout

        disable_dropout(model)
        collate = MPOCollator(tok.pad_token_id)
        collated = [
            collate(build_examples(tok, to_table(rows, "pairs"), None, args.max_length)) for rows in batches
        ]
        reference = None
        if args.variant == "precomputed":
            with torch.no_grad():  # what the reference stage stores, computed before timing
                for batch in collated:
                    out = reference_outputs(model.eval(), side(batch, "dominant"))
                    batch["ref_gap"], batch["ref_pooled"] = out["reward_gap"], out["pooled"]
        else:
            import copy

            reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for i, batch in enumerate(collated):
            start = time.perf_counter()
            if args.variant == "precomputed":
                mpo_backward_step(model, batch, 1.0, 1.0)
            else:
                loss, _ = paper_mpo_loss(model, reference, batch, 1.0)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                step_times.append(elapsed)
                for name in ("target", "dominant"):
                    mask = batch[f"{name}_attention_mask"]
                    tokens["real"] += int(mask.sum())
                    tokens["executed"] += int(mask.sum())
                    if args.variant == "precomputed":  # each pair's shared prompt runs once
                        tokens["executed"] -= int(pair_prefix_lengths(batch[f"{name}_input_ids"], mask).sum())
                tokens["response"] += int(batch["target_response_mask"][:, 1:].sum())
    n_head = model.get_output_embeddings().weight.numel()
    n_embed = model.get_input_embeddings().weight.numel()
    n_total = sum(p.numel() for p in model.parameters())
    return {
        "variant": args.variant,
        "median_step_s": statistics.median(step_times),
        "step_times_s": step_times,
        "peak_mem_mib": peak_rss_mib() - base_rss,
        "tokens_per_step": {k: v / max(1, len(step_times)) for k, v in tokens.items()},
        "n_body": n_total - n_embed,
        "n_head": n_head,
        "threads": torch.get_num_threads(),
    }


def run_synthetic_variant(args) -> dict:
    """One variant of the ``--synthetic`` mode: random model and tokens, bf16 autocast, ``args.device``."""
    import torch

    from mpo_core.method.objective import mpo_backward_step, paper_mpo_loss, side
    from mpo_core.method.packed import pair_prefix_lengths
    from mpo_core.method.reference import reference_outputs

    cuda = args.device == "cuda"
    base_rss = rss_mib()
    model, tok, batches = synthetic_setup(args)
    autocast = lambda: torch.autocast(args.device, dtype=torch.bfloat16)
    tokens = {"real": 0, "executed": 0, "response": 0}
    if args.variant == "trl_dpo":
        step_times = run_trl_dpo(args, model, tok, [synthetic_rows(batch) for batch in batches])
    else:
        reference = None
        if args.variant == "precomputed":
            with torch.no_grad(), autocast():
                for batch in batches:
                    out = reference_outputs(model.eval(), side(batch, "dominant"))
                    batch["ref_gap"], batch["ref_pooled"] = out["reward_gap"].float(), out["pooled"].float()
        else:
            import copy

            reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
        step_times = []
        for i, batch in enumerate(batches):
            _synchronize(args.device)
            start = time.perf_counter()
            if args.variant == "precomputed":
                mpo_backward_step(model, batch, 1.0, 1.0, forward_context=autocast)
            else:
                with autocast():
                    loss, _ = paper_mpo_loss(model, reference, batch, 1.0)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(args.device)
            if i >= args.warmup:
                step_times.append(time.perf_counter() - start)
                for name in ("target", "dominant"):
                    mask = batch[f"{name}_attention_mask"]
                    tokens["real"] += int(mask.sum())
                    tokens["executed"] += int(mask.sum())
                    if args.variant == "precomputed":
                        tokens["executed"] -= int(pair_prefix_lengths(batch[f"{name}_input_ids"], mask).sum())
                tokens["response"] += int(batch["target_response_mask"][:, 1:].sum())
    n_head = model.get_output_embeddings().weight.numel()
    n_total = sum(p.numel() for p in model.parameters())  # tied embeddings: the head's weight counts once
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib() - base_rss
    return {
        "variant": args.variant,
        "median_step_s": statistics.median(step_times),
        "step_times_s": step_times,
        "peak_mem_mib": peak,
        "tokens_per_step": {k: v / max(1, len(step_times)) for k, v in tokens.items()},
        "n_body": n_total - n_head,
        "n_head": n_head,
        "threads": torch.get_num_threads(),
    }


def synthetic_rows(batch: dict) -> list[dict]:
    """The target side of a synthetic batch as TRL preference rows (text of :func:`synthetic_tokenizer`)."""
    from mpo_core.method.synthetic import as_words

    ids, mask, response = (batch[f"target_{k}"].tolist() for k in ("input_ids", "attention_mask", "response_mask"))
    n = len(ids) // 2
    rows = []
    for b in range(n):
        answers = []
        for row in (b, b + n):
            real = sum(mask[row])
            prompt_len = real - sum(response[row])
            answers.append(ids[row][prompt_len:real])
        prompt = ids[b][: sum(mask[b]) - sum(response[b])]
        rows.append({"prompt": as_words(prompt).strip(), "chosen": as_words(answers[0]), "rejected": as_words(answers[1])})
    return rows


def run_trl_dpo(args, model, tok, batches) -> list[float]:
    """Time the optimizer steps of TRL's DPOTrainer (sigmoid) on the target side of the same pairs."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = []
    for batch in batches:
        for r in batch:
            if args.synthetic:  # already TRL rows, as text of the synthetic tokenizer
                rows.append(r)
                continue
            rows.append(
                {
                    "prompt": [{"role": "user", "content": r["target_prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["target_chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["target_rejected"]}],
                }
            )
    times: list[float] = []
    device = getattr(args, "device", "cpu")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            _synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _synchronize(device)
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.pairs_per_step,
            max_steps=args.warmup + args.steps,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            max_length=args.max_length,
            bf16=bool(args.synthetic),
            gradient_checkpointing=False,
            use_cpu=device == "cpu",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=1000,
            beta=0.1,
            loss_type=["sigmoid"],
        )
        import copy

        trainer = DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model) if args.synthetic else None,  # no path to load it from
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[StepTimer()],
        )
        trainer.train()
    return times[args.warmup :]


def matmul_peak_gflops(size: int = 2048, reps: int = 5, device: str = "cpu", dtype: str = "float32") -> float:
    """Best ``torch.mm`` throughput of ``size x size`` matrices of ``dtype`` on ``device`` over ``reps`` tries
    (GFLOP/s)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        _synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--pairs-per-step", type=int, default=4, help="real quadruples per optimizer step (4 = 16 sequences)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--synthetic", choices=("tiny", "1b"), help="random Llama model and tokens, bf16, no data")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where present (--synthetic)")
    parser.add_argument("--matmul-size", type=int, help="side of the peak-measuring matmul (default: 2048; "
                        "--synthetic: 8192 on cuda, 512 on cpu)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.synthetic and args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.synthetic:
        main_synthetic(args)
        return
    if not (SHARED_DATA / "mpo_official").is_dir():
        sys.exit(f"real data not found at {SHARED_DATA} (set MPO_SHARED_DATA)")

    peak_before = matmul_peak_gflops(args.matmul_size or 2048)
    results = run_subprocesses(args)
    peak = max(peak_before, matmul_peak_gflops(args.matmul_size or 2048))
    a, b = results["precomputed"], results["online"]
    head_flops = 6 * a["n_head"] * a["tokens_per_step"]["response"]
    flops = 6 * a["n_body"] * a["tokens_per_step"]["executed"] + head_flops
    unshared_flops = 6 * a["n_body"] * a["tokens_per_step"]["real"] + head_flops
    achieved = flops / a["median_step_s"] / 1e9
    print(f"pairs_per_step={args.pairs_per_step} max_length={args.max_length} threads={a['threads']}")
    print(
        f"tokens_per_step(a)={a['tokens_per_step']} model_gflop_per_step(a)={flops / 1e9:.1f} "
        f"(unshared prompts: {unshared_flops / 1e9:.1f})"
    )
    print(f"achieved_gflops(a)={achieved:.1f} matmul_peak_fp32_gflops={peak:.1f} loadavg={os.getloadavg()}")
    print(
        f"step_time_ratio_dpo_over_precomputed={results['trl_dpo']['median_step_s'] / a['median_step_s']:.3f} "
        f"peak_mem_ratio_dpo_over_precomputed={results['trl_dpo']['peak_mem_mib'] / a['peak_mem_mib']:.3f}"
    )
    print(
        f"step_time_ratio_online_over_precomputed={b['median_step_s'] / a['median_step_s']:.3f} "
        f"peak_mem_ratio_online_over_precomputed={b['peak_mem_mib'] / a['peak_mem_mib']:.3f} "
        f"mfu={achieved / peak:.3f}"
    )


def run_subprocesses(args) -> dict:
    """Each variant in a fresh subprocess (its own peak memory); prints one line per variant."""
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant]
        cmd += ["--pairs-per-step", str(args.pairs_per_step), "--max-length", str(args.max_length)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.synthetic:
            cmd += ["--synthetic", args.synthetic, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 and args.synthetic and variant == "trl_dpo":  # the GPU check goes on without it
            print(f"trl_dpo failed (reported as n/a):\n{proc.stderr[-2000:]}", flush=True)
            continue
        if proc.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(
            f"{variant:12s} median_step_s={r['median_step_s']:.3f} peak_mem_mib={r['peak_mem_mib']:.0f} "
            f"steps={[round(t, 3) for t in r['step_times_s']]}",
            flush=True,
        )
    return results


def main_synthetic(args) -> None:
    """The ``--synthetic`` comparison; the last line carries the three figures ``gpu-check.sh`` reports."""
    size = args.matmul_size or (8192 if args.device == "cuda" else 512)
    peak = matmul_peak_gflops(size, device=args.device, dtype="bfloat16")
    results = run_subprocesses(args)
    peak = max(peak, matmul_peak_gflops(size, device=args.device, dtype="bfloat16"))
    a, b, dpo = results["precomputed"], results["online"], results.get("trl_dpo")
    flops = 6 * a["n_body"] * a["tokens_per_step"]["executed"] + 6 * a["n_head"] * a["tokens_per_step"]["response"]
    achieved = flops / a["median_step_s"] / 1e9
    print(
        f"synthetic={args.synthetic} device={args.device} n_params={a['n_body'] + a['n_head']} "
        f"pairs_per_step={args.pairs_per_step} max_length={args.max_length} "
        f"matmul_peak_bf16_gflops={peak:.1f} achieved_gflops={achieved:.1f} loadavg={os.getloadavg()}"
    )
    if dpo is not None:
        print(
            f"dpo_step_ratio={dpo['median_step_s'] / a['median_step_s']:.3f} "
            f"dpo_peak_mem_ratio={dpo['peak_mem_mib'] / a['peak_mem_mib']:.3f}"
        )
    print(
        f"gpu_step_ratio={b['median_step_s'] / a['median_step_s']:.3f} "
        f"gpu_peak_mem_ratio={b['peak_mem_mib'] / a['peak_mem_mib']:.3f} gpu_mfu={achieved / peak:.3f}"
    )


if __name__ == "__main__":
    main()
