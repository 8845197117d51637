"""Secrets hidden wherever the project writes or prints: by value first, then by the shape of a URI.

By value: the exact secrets this process knows (passwords and tokens in its environment, the user-info and token
query parameters of every URI there), as typed and percent-encoded, are replaced wherever they stand, whatever
characters they hold. By shape: the user-info of any URI in the text (`user:password@`), and the values of
token-like query parameters (`?access_token=...`), for secrets the environment does not hold.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from urllib.parse import quote, quote_plus, unquote, urlsplit

HIDDEN = "***"
# Shorter values would hide ordinary words and numbers; a secret that short is no secret.
MIN_SECRET_CHARS = 4
# A user-info without a password is a token (https://ghp_...@github.com/) when this long, else a user name.
MIN_BARE_TOKEN_CHARS = 16
# Environment variables whose values are secrets, by the words of their names (split at `_`): a word that is or ends
# with one of these (PGPASSWORD, MYSQL_PWD, DB_PASS, AWS_SECRET_ACCESS_KEY, OPENAI_APIKEY, HF_TOKEN), or that starts
# with CREDENTIAL, or the pair AUTH_STRING (PREFECT_API_AUTH_STRING). TOKENIZERS_PARALLELISM and KEYRING_PROVIDER are
# no secrets: their words only start with a marker.
SECRET_WORD_ENDINGS = ("PASSWORD", "PASSWD", "PASS", "PWD", "SECRET", "TOKEN", "KEY")
SECRET_WORD_STARTS = ("CREDENTIAL",)
# The shell's working directories, named like a password.
NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD"})
# Names of such variables that hold a setting about a secret, not the secret (HF_HUB_DISABLE_IMPLICIT_TOKEN=1,
# SSH_KEY_PATH=~/.ssh/id): a value that is an existing file's path is never one either
# (GOOGLE_APPLICATION_CREDENTIALS=/path/to/key.json).
SETTING_VARIABLE = re.compile(r"DISABLE|ENABLE|IMPLICIT|_PATH$|_FILE$|_DIR$|_TTL$|EXPIR")
# A URI in running text: a scheme, then anything up to whitespace, a quote or a bracket.
URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
# Query parameters that carry credentials: OAuth tokens, API keys, signed-URL signatures (S3, GCS, Azure SAS).
TOKEN_PARAMETER = re.compile(
    r"(?i)([?&](?:access_token|id_token|refresh_token|token|api_key|apikey|key|password|passwd|secret|sig|"
    r"signature|code|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)"
    r"([^&#\s'\"<>]+)"
)

_cache: tuple[int, tuple[str, ...]] = (0, ())


def uri_secrets(value: str) -> set[str]:
    """The password (or bare token) of a URI's user-info and its token-like query values.

    The user-info ends at the last `@`: a password may hold `@`, `/`, `?` or `#` unescaped, which a URI parser would
    cut elsewhere."""
    found = {match.group(2) for match in TOKEN_PARAMETER.finditer(value)}
    for uri in [value, *URI_IN_TEXT.findall(value)] if "://" in value else []:
        rest = uri.partition("://")[2]
        if "@" in rest:
            user_info = rest[: rest.rfind("@")]
            if ":" in user_info:
                found.add(user_info.partition(":")[2])
            elif len(user_info) >= MIN_BARE_TOKEN_CHARS:  # a token as the user-info, not a user name
                found.add(user_info)
    return found


def secret_variable(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret (see SECRET_WORD_ENDINGS)."""
    name = name.upper()
    if name in NOT_SECRET_NAMES or SETTING_VARIABLE.search(name):
        return False
    words = name.split("_")
    return (
        any(word.endswith(SECRET_WORD_ENDINGS) or word.startswith(SECRET_WORD_STARTS) for word in words)
        or "AUTH_STRING" in name
    )


def known_secrets(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every secret the environment holds, in each form it may be printed in.

    Every secret the environment holds, in each form it may be printed in, longest first (so a secret that contains
    another is hidden whole)."""
    environ = os.environ if environ is None else environ
    raw: set[str] = set()
    for name, value in environ.items():
        if secret_variable(name) and not (os.path.isabs(value) and os.path.exists(value)):
            raw.add(value)
        raw |= uri_secrets(value)
    forms = {form for secret in raw for form in (secret, quote(secret, safe=""), quote(secret), quote_plus(secret))}
    forms |= {unquote(form) for form in forms}
    return tuple(sorted((form for form in forms if len(form) >= MIN_SECRET_CHARS), key=len, reverse=True))


def _current_secrets() -> tuple[str, ...]:
    """known_secrets of os.environ, recomputed only when the environment changed."""
    global _cache
    key = hash(frozenset(os.environ.items()))
    if _cache[0] != key:
        _cache = (key, known_secrets())
    return _cache[1]


def redact(text: str) -> str:
    """text with every secret hidden.

    text with every known secret hidden, then the user-info of every URI in it (`user:password@` becomes
    `user:***@`, `token@` `***@`) and every token-like query value (`?access_token=***`)."""
    for secret in _current_secrets():
        text = text.replace(secret, HIDDEN)
    text = URI_IN_TEXT.sub(_hide_user_info, text)
    return TOKEN_PARAMETER.sub(lambda match: match.group(1) + HIDDEN, text)


def _hide_user_info(match: re.Match) -> str:
    uri = match.group(0)
    scheme, _, rest = uri.partition("://")
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    at = head.rfind("@")
    if at < 0:
        return uri
    user_info, host = rest[:at], rest[at + 1 :]
    user = urlsplit(f"{scheme}://{user_info.split('/')[0]}@{host}").username if ":" in user_info else None
    return f"{scheme}://{f'{user}:' if user else ''}{HIDDEN}@{host}"


class RedactedStream:
    """A text stream (stdout, stderr) that redacts what is written to it.

    Prints, warnings and the log lines of the libraries (MLflow names its server's URI in its messages), whoever
    writes them."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding: the stream's own
        return getattr(self._stream, name)


def redact_output() -> None:
    """Route this process's stdout and stderr through redact (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactedStream):
            setattr(sys, name, RedactedStream(stream))
