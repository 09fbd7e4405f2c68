"""Credentials kept out of everything inflora-ray stores, logs or prints.

A URI's password (``scheme://user:PASSWORD@host``) and the values of query parameters whose names say they
are secret (``?token=``, ``password=``, ``api_key=``, ``X-Amz-Signature=``, ...) become ``***``. Everything
else of the URI stays as written; strings without credentials (``sqlite:///mlflow.db``, a path) are returned
unchanged. Pure string functions: no MLflow, no I/O.

A process that holds credentials (a run's driver, its workers, the data CLI) hands the URIs that carry them to
:func:`remember_secrets` once; from then on :func:`redact_text`, which every printed error and every log line
goes through, also takes those secrets out where they appear without their URI (an error message that quotes a
bucket name ``KEY:SECRET@bucket``, a decoded query value).
"""
from __future__ import annotations

import re
import threading
from urllib.parse import unquote, unquote_plus, urlsplit

REDACTED = "***"

# Query parameter names that carry secrets: password, passwd, pwd, (access_)token, secret, (api_)key,
# auth, credential(s), signature (presigned URLs), sig (Azure SAS).
_SECRET_NAME = re.compile(r"pass|pwd|token|secret|key|auth|credential|signature|^sig$", re.IGNORECASE)
# A URL inside free text (an error message, a param value): scheme://... up to white space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _redact_query(query: str) -> tuple[str, list[str]]:
    """The query string with secret parameter values replaced, and those values."""
    pieces, secrets = [], []
    for piece in query.split("&"):
        name, eq, value = piece.partition("=")
        if eq and value and _SECRET_NAME.search(unquote_plus(name)):
            secrets.append(value)
            piece = f"{name}={REDACTED}"
        pieces.append(piece)
    return "&".join(pieces), secrets


def _split_secrets(uri: str) -> tuple[str, list[str]]:
    """``uri`` with every secret replaced by ``***``, and the secrets as written in it.

    The URI is edited as a string (never re-assembled by ``urlunsplit``), so nothing else of it changes."""
    if not isinstance(uri, str):
        raise TypeError(f"expected a URI string, got {type(uri).__name__}")
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unclosed '[' in the host: no part of it can be shown safely
        return REDACTED, [uri]
    out, secrets = uri, []
    if parts.password:
        user_info, _, host = parts.netloc.rpartition("@")
        user = user_info.split(":", 1)[0]
        out = out.replace(f"//{parts.netloc}", f"//{user}:{REDACTED}@{host}", 1)
        secrets.append(parts.password)
    if parts.query:
        query, found = _redact_query(parts.query)
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
        secrets += found
    return out, secrets


def redact_uri(uri: str) -> str:
    """``uri`` with its password and secret query parameters replaced by ``***``; unchanged without any.

    >>> redact_uri("https://alice:s3cret@mlflow.example.org:5000")
    'https://alice:***@mlflow.example.org:5000'
    >>> redact_uri("sqlite:///mlflow.db")
    'sqlite:///mlflow.db'
    """
    return _split_secrets(uri)[0]


def has_secrets(uri: str) -> bool:
    """True if ``uri`` holds a password or a secret query parameter (redacted or not)."""
    return bool(_split_secrets(uri)[1])


def is_redacted(uri: str) -> bool:
    """True if ``uri`` went through :func:`redact_uri` and lost a secret (``user:***@``, ``token=***``): it
    can no longer authenticate, so the user must give the URI again."""
    return REDACTED in _split_secrets(uri)[1]


def _forms(uri: str) -> set[str]:
    """The secrets of ``uri`` as written, percent-decoded and form-decoded (none for a redacted one)."""
    return {form for secret in _split_secrets(uri)[1] if secret != REDACTED
            for form in (secret, unquote(secret), unquote_plus(secret)) if form}


# Secrets this process uses (remember_secrets), taken out of every text by redact_text. Shorter ones are left to
# the URL-level redaction: replacing every occurrence of two letters would garble each message.
_REMEMBERED: set[str] = set()
_REMEMBERED_LOCK = threading.Lock()
MIN_REMEMBERED_CHARS = 4


def remember_secrets(*uris) -> None:
    """From now on, in this process, :func:`redact_text` replaces the secrets of ``uris`` (the URIs with
    credentials a run or command uses: ``None`` and plain paths are skipped) wherever they appear, with or
    without their URI. Secrets shorter than :data:`MIN_REMEMBERED_CHARS` are redacted only inside URLs."""
    found = {form for uri in uris if isinstance(uri, str) for form in _forms(uri)
             if len(form) >= MIN_REMEMBERED_CHARS}
    if found:
        with _REMEMBERED_LOCK:
            _REMEMBERED.update(found)


def redact_text(text: str, *uris: str) -> str:
    """``text`` (an error message, a log line, a param value) with every URL in it redacted, and every
    secret of ``uris`` (the URIs in use, which may appear cut up or decoded) and of :func:`remember_secrets`
    replaced by ``***``."""
    text = _URL_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), str(text))
    with _REMEMBERED_LOCK:
        secrets = set(_REMEMBERED)
    for uri in uris:
        secrets |= _forms(uri)
    for secret in sorted(secrets, key=len, reverse=True):  # a longer secret before any that is part of it
        text = text.replace(secret, REDACTED)
    return text


def redact_tree(value):
    """``value`` (JSON-like: dicts, lists, tuples, strings, numbers) with every string in it, keys included,
    passed through :func:`redact_text`: a record about to be stored (a dataset's provenance names its URI)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value
