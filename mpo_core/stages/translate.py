"""Bringing prompts into every language of the run: ``provided``, ``llm`` or ``seq2seq``.

The output holds, for every prompt, one row in ``run.dominant_lang`` and one in each ``run.target_langs``.
Rows the prompt set already has in a language are kept as they are (their ``translated_by`` says where
they came from). Missing rows are made by ``translate.backend``:

- ``provided``: nothing is translated; a missing (prompt_id, lang) is an error naming it.
- ``llm``: the model itself (``translate.model`` or the run's model) is asked, greedily, through the
  generation backend, to translate the dominant-language text; ``translated_by = "llm:<model>"``.
- ``seq2seq``: an MT model through transformers ``AutoModelForSeq2SeqLM``: NLLB (FLORES-200 codes such as
  ``zho_Hans``), M2M-100 (ISO codes) or Marian (``Helsinki-NLP/opus-mt-{src}-{tgt}``: ``{src}``/``{tgt}``
  in the id are filled per language pair); ``translated_by = "seq2seq:<model>"``.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from mpo_core.generation.vllm_backend import vllm_engine_scope
from mpo_core.plumbing.config import GenerateConfig, PipelineConfig
from mpo_core.plumbing.errors import ConfigError, InputDataError
from mpo_core.plumbing.languages import language_name
from mpo_core.plumbing.progress import track
from mpo_core.plumbing.stage_run import Artifact, StageRun

if TYPE_CHECKING:
    from mpo_core.plumbing.config import ModelConfig

# ISO 639-1 -> FLORES-200 code used by NLLB.
NLLB_CODES = {
    "en": "eng_Latn", "zh": "zho_Hans", "ja": "jpn_Jpan", "ko": "kor_Hang", "ar": "arb_Arab",
    "bn": "ben_Beng", "sw": "swh_Latn", "fr": "fra_Latn", "de": "deu_Latn", "es": "spa_Latn",
    "it": "ita_Latn", "pt": "por_Latn", "ru": "rus_Cyrl", "vi": "vie_Latn", "th": "tha_Thai",
    "jv": "jav_Latn", "te": "tel_Telu", "hi": "hin_Deva", "id": "ind_Latn", "tr": "tur_Latn",
}


def nllb_code(lang: str) -> str:
    """The FLORES-200 code NLLB expects for ``lang`` (``zh`` -> ``zho_Hans``)."""
    try:
        return NLLB_CODES[lang]
    except KeyError:
        raise ConfigError(f"no NLLB code known for language {lang!r}; known: {', '.join(sorted(NLLB_CODES))}") from None


def seq2seq_family(model_id: str) -> str:
    """``nllb``, ``m2m`` or ``marian`` from the model id."""
    lowered = model_id.lower()
    if "nllb" in lowered:
        return "nllb"
    if "m2m" in lowered:
        return "m2m"
    return "marian"


def llm_translation_prompt(text: str, source_lang: str, target_lang: str) -> str:
    """The instruction given to the LLM translator."""

    return (
        f"Translate the following text from {language_name(source_lang)} to {language_name(target_lang)}. "
        "Reply with the translation only, without comments or answers to it.\n\n"
        f"{text}"
    )


def translate_llm(
    model_cfg: ModelConfig, texts: list[str], source_lang: str, target_lang: str, gen_cfg: GenerateConfig,
    max_new_tokens: int,
) -> list[str]:
    """Greedy translations of ``texts`` by a chat LLM through ``gen_cfg``'s backend (transformers or vLLM)."""
    from mpo_core.generation.responses import generate_responses

    prompts = [
        {"prompt_id": str(i), "lang": target_lang, "text": llm_translation_prompt(t, source_lang, target_lang)}
        for i, t in enumerate(texts)
    ]
    rows = generate_responses(
        model_cfg, gen_cfg, prompts,
        num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens,
    )
    return [r["text"] for r in rows]


def translate_seq2seq(
    model_id: str, texts: list[str], source_lang: str, target_lang: str, batch_size: int,
    max_new_tokens: int, device: str = "cpu",
) -> list[str]:
    """Beam-free translations of ``texts`` with an NLLB, M2M-100 or Marian model."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    family = seq2seq_family(model_id)
    model_id = model_id.format(src=source_lang, tgt=target_lang) if family == "marian" else model_id
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_id, use_safetensors=True).to(device).eval()
    generate_kwargs: dict = {"max_new_tokens": max_new_tokens}
    if family == "nllb":
        tokenizer.src_lang = nllb_code(source_lang)
        generate_kwargs["forced_bos_token_id"] = tokenizer.convert_tokens_to_ids(nllb_code(target_lang))
    elif family == "m2m":
        tokenizer.src_lang = source_lang
        generate_kwargs["forced_bos_token_id"] = tokenizer.get_lang_id(target_lang)
    import torch

    outputs: list[str] = []
    starts = range(0, len(texts), batch_size)
    for start in track(starts, total=len(starts), desc=f"translate {target_lang}", unit="batch"):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            generated = model.generate(**batch, **generate_kwargs)
        outputs.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    return [o.strip() for o in outputs]


def translate_prompts(config: PipelineConfig, rows: list[dict], origin: str = "prompts") -> list[dict]:
    """PROMPTS rows in the dominant and every target language (see the module docstring)."""
    cfg = config.translate
    dominant = config.run.dominant_lang
    langs = [dominant, *config.run.target_langs]
    by_key = {(r["prompt_id"], r["lang"]): r for r in rows}
    prompt_ids = sorted({r["prompt_id"] for r in rows})
    missing_dominant = [pid for pid in prompt_ids if (pid, dominant) not in by_key]
    if missing_dominant:
        raise InputDataError(
            f"{origin}: {len(missing_dominant)} prompt(s) have no {dominant!r} (dominant language) row, "
            f"first: prompt_id={missing_dominant[0]!r}"
        )
    missing = [(pid, lang) for lang in langs for pid in prompt_ids if (pid, lang) not in by_key]
    if missing and cfg.backend == "provided":
        pid, lang = missing[0]
        raise InputDataError(
            f"{origin}: translate.backend 'provided' but {len(missing)} (prompt_id, lang) row(s) are missing, "
            f"first: prompt_id={pid!r} lang={lang!r}"
        )
    model_name = cfg.model or config.model.name_or_path
    for lang in langs[1:]:
        todo = [pid for pid in prompt_ids if (pid, lang) not in by_key]
        if not todo:
            continue
        texts = [by_key[(pid, dominant)]["text"] for pid in todo]
        if cfg.backend == "llm":
            model_cfg = config.model.model_copy(update={"name_or_path": model_name})
            gen_cfg = config.generate.model_copy(update={"batch_size": cfg.batch_size})
            translated = translate_llm(model_cfg, texts, dominant, lang, gen_cfg, cfg.max_new_tokens)
        else:
            if not cfg.model:
                raise ConfigError("translate.backend 'seq2seq' needs translate.model (an NLLB/M2M/Marian id)")
            from mpo_core.common.models import resolve_device

            translated = translate_seq2seq(
                cfg.model, texts, dominant, lang, cfg.batch_size, cfg.max_new_tokens,
                device=resolve_device(config.model.device),
            )
        for pid, text in zip(todo, translated, strict=True):
            by_key[(pid, lang)] = by_key[(pid, dominant)] | {
                "lang": lang, "text": text, "translated_by": f"{cfg.backend}:{model_name}",
            }
    return [by_key[(pid, lang)] for pid in prompt_ids for lang in langs]


def run_translate(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``translate``: ``prompts`` -> ``translated`` (PROMPTS in the dominant and target languages).

    Rows come prompt by prompt (sorted ids), so a shard (a slice of the sorted prompt ids) writes a
    contiguous part of the unsharded output."""
    rows = stage.inputs.table("prompts").to_pylist()
    own = set(stage.own_rows(sorted({row["prompt_id"] for row in rows})))
    rows = [row for row in rows if row["prompt_id"] in own]
    with vllm_engine_scope():
        translated = translate_prompts(stage.config, rows, origin=str(stage.inputs.path("prompts")))
    by = Counter(row["translated_by"] for row in translated)
    return {"translated": Artifact(translated, {"rows": len(translated), "translated_by": dict(sorted(by.items()))})}
