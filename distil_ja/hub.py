"""Hugging Face hub names: used from the local cache, fetched, or refused at once in one line.

Without a network, transformers and huggingface_hub retry each file with back-off (minutes per
model) and then report something else: a missing config, or, through a tokenizer fallback, a
tokenizer of four tokens. Every load of a name that is not a local folder goes through
`check_fetchable` first: a folder or a cached name passes at once; otherwise one quick request
to the hub decides, and an unreachable hub or HF_HUB_OFFLINE without a cached copy is one
UsageError line that says how to point at a local folder instead.
"""

import os
import urllib.error
import urllib.request
from pathlib import Path

from distil_ja.cli import UsageError

PROBE_TIMEOUT_S = 10


def looks_local(name: str) -> bool:
    """A path rather than a hub name ("org/name" or "name")."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or Path(name).exists()


def is_cached(name: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except ValueError:  # not a valid repo id
        return False


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_fetchable(name: str, what: str, filename: str = "config.json") -> None:
    """Return if `name` (a --teacher_name, --tokenizer, ... value) can be loaded; else UsageError."""
    name = os.fspath(name)
    if Path(name).exists():
        return
    if looks_local(name):
        raise UsageError(f"cannot load {what} {name!r}: no such file or directory")
    if is_cached(name, filename):
        return
    advice = (f"download it where the hub is reachable (`hf download {name} --local-dir DIR`) "
              "and pass DIR instead")
    if offline():
        raise UsageError(f"{what} {name!r} is neither a local folder nor in the Hugging Face cache, and "
                         f"HF_HUB_OFFLINE is set: {advice}")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the hub answered: whether the name exists is for the download to say
    except (OSError, ValueError) as err:  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        reason = getattr(err, "reason", err)
        raise UsageError(f"{what} {name!r} is not a local folder and the Hugging Face hub ({endpoint()}) "
                         f"cannot be reached ({reason}): {advice}") from err
