"""Secret-looking values out of what a run shows and keeps (`ddl show`, the run directory's config.yaml).

Two rules: a text value under a key named like a secret (api_key, hf_token, password, aws_secret_access_key,
credentials, auth...) becomes "***", and so does any part of a text that looks like a known token format (Hugging
Face, OpenAI, AWS, GitHub, Slack, Google keys, private-key blocks, passwords in URLs). Numbers and flags stay as
they are (`max_tokens: 128` is no secret). Secrets belong in the environment, not in recipes: a redacted value
is gone from config.yaml, which `ddl eval` and `ddl predict` read back.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# One word of a key (split at '_', '-', '.', and camelCase): the secret ones, alone or in a compound (apikey).
SECRET_WORD = re.compile(r"(api|access|private|secret|session|client)?"
                         r"(keys?|tokens?|secrets?|passw(or)?ds?|pwd|credentials?|auth|authorization)", re.IGNORECASE)
KEY_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
TOKEN_FORMATS = re.compile("|".join([
    r"\bhf_[A-Za-z0-9]{30,}",                         # Hugging Face
    r"\bsk-[A-Za-z0-9_-]{20,}",                       # OpenAI and others
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",                 # AWS access key id
    r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",  # GitHub
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",                # Slack
    r"\bAIza[0-9A-Za-z_-]{35}",                       # Google API key
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
]))
URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@]+):[^/\s@]+@")  # scheme://user:password@host


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and any(SECRET_WORD.fullmatch(word) for word in KEY_WORDS.findall(key))


def redact_text(text: str) -> str:
    """The text with every token-like part and every password in a URL replaced."""
    return URL_PASSWORD.sub(rf"\1:{REDACTED}@", TOKEN_FORMATS.sub(REDACTED, text))


def redact(value: Any, secret: bool = False) -> Any:
    """A copy of nested dicts / lists with secret-looking text replaced by "***" (`secret`: under a secret key)."""
    if isinstance(value, dict):
        return {k: redact(v, secret or is_secret_key(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secret) for v in value]
    if isinstance(value, str):
        return REDACTED if secret else redact_text(value)
    return value
