"""Hub tokens: read from the environment or a Prefect Secret block, and never shown in logs or artifacts.

:func:`load_hub_token` puts the token in ``HF_TOKEN`` (where ``huggingface_hub`` reads it) when only a
Secret block holds it (block name in ``MPO_HF_TOKEN_BLOCK``). :func:`install_redaction` replaces every known
secret value in every log record created in this process, whichever logger or handler it goes to, and
:func:`redact` does the same for text we publish (artifacts, summaries).
"""

from __future__ import annotations

import logging
import os

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "PREFECT_API_KEY")
TOKEN_BLOCK_ENV = "MPO_HF_TOKEN_BLOCK"
MASK = "***"
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words

_installed = False


def secret_values() -> list[str]:
    """The secret values present in this process's environment, longest first."""
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every known secret value replaced by ``***``."""
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def install_redaction() -> None:
    """Wrap the log record factory so that no record in this process carries a secret (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if secret_values():
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return record

    logging.setLogRecordFactory(redacting_factory)
    _installed = True


def load_hub_token() -> bool:
    """Ensure ``HF_TOKEN`` is set from the environment or the Secret block named by ``MPO_HF_TOKEN_BLOCK``.

    Returns whether a token is available. The token itself is never returned, logged or stored.
    """
    install_redaction()
    if any(os.environ.get(name) for name in SECRET_ENV_VARS[:3]):
        return True
    block_name = os.environ.get(TOKEN_BLOCK_ENV)
    if not block_name:
        return False
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(block_name)
    except ValueError:  # no such block: public or cached models need no token, gated ones fail when fetched
        logging.getLogger(__name__).warning(
            "no Secret block %r on the Prefect server (%s): running without a hub token",
            block_name,
            TOKEN_BLOCK_ENV,
        )
        return False
    os.environ["HF_TOKEN"] = secret.get()
    return True
