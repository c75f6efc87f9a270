"""Conversations (chat data) as token sequences with a loss mask: what binarize.py does with .jsonl input.

A JSONL line is one conversation in either of the shapes TRL reads:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}                       a user message, then an assistant message
    {"prompt": [messages...], "completion": [assistant messages...]}

Only "role" and "content" of a message are read (other keys, and other keys of the line, are ignored).
The tokens that count in the loss are those of every assistant message of a "messages" line and those
of the completion of a prompt/completion line (the prompt's own assistant turns are context, as TRL's
completion-only loss has it).

Rendering is the chat template's (tokenizer.apply_chat_template, or a template file); the mask comes
from rendering the conversation prefix by prefix: with R(k) the text of the first k messages and G(k)
that text plus the generation prompt, an assistant message k is the text between G(k) and R(k+1): its
content and whatever the template writes after it in that turn (the end-of-turn token). Everything
else (the bos, system and user turns, role headers, the generation prompt) is context. A template for
which these renders are not prefixes of one another (one that rewrites earlier turns) is refused: the
turns could not be told apart. Each such piece of text is encoded on its own, so no token straddles a
mask boundary.

Encoding keeps the student's recipe (distil_ja.tokenization.DocumentEncoder): the rendered text is cut
at the tokenizer's added tokens (the template's special tokens, <s> and </s> included), which become
their ids; the text between them is encoded as plain text is, line by line with sentencepiece, NFKC +
lowercased when the recipe lowercases. The lowercasing applies to the template's plain-text markup as
well as to the contents: the vocabulary is lowercase either way, and uppercase markup would be <unk>.
A message whose content holds an added token's string is refused (it would be read as that token).
"""

import bisect
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil_ja.cli import DataError, UsageError, first_line

ROLES = ("system", "user", "assistant")
CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.bz2")
DEFAULT_MAX_LEN = 1024
SANE_MODEL_MAX_LENGTH = 1 << 20  # transformers' "no limit" is 1e30: above this, the default max_len


@dataclass(frozen=True)
class Conversation:
    """The messages of one line ({"role", "content"} each) and, per message, whether it is trained on."""

    messages: tuple
    trained: tuple


# ---- reading a line -----------------------------------------------------------------------


def parse_line(text: str, where: str) -> Conversation:
    """One JSONL line as a Conversation; DataError `where: what` for anything malformed."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict) or ("messages" in value) == ("prompt" in value or "completion" in value):
        raise DataError(f'{where}: expected a JSON object with "messages", or with "prompt" and "completion"')
    if "messages" in value:
        messages = _messages(value["messages"], "messages", where)
        trained = [m["role"] == "assistant" for m in messages]
    else:
        prompt, completion = _prompt_completion(value, where)
        messages = prompt + completion
        trained = [False] * len(prompt) + [True] * len(completion)
    if not any(trained):
        raise DataError(f"{where}: no assistant message (nothing to learn)")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is the assistant's (a chat template renders no prompt before it)")
    return Conversation(tuple(messages), tuple(trained))


def _messages(value, key: str, where: str) -> list[dict]:
    """A non-empty list of {"role", "content"} messages (a copy holding those two keys only)."""
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: "{key}" must be a non-empty list of messages')
    out = []
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise DataError(f'{where}: {key} message {n} needs a "role" and a "content" string')
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {key} message {n} has the unknown role {message['role']!r} "
                            f"({', '.join(ROLES)})")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt_completion(value: dict, where: str) -> tuple[list[dict], list[dict]]:
    """The prompt's messages and the completion's (all assistant messages): strings or message lists, alike."""
    prompt, completion = value.get("prompt"), value.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise DataError(f'{where}: "prompt" and "completion" must both be strings or both lists of messages')
    completion = _messages(completion, "completion", where)
    if any(m["role"] != "assistant" for m in completion):
        raise DataError(f"{where}: the completion holds a message that is not the assistant's")
    return _messages(prompt, "prompt", where), completion


# ---- the template -------------------------------------------------------------------------


def chat_template(tokenizer, template_file=None) -> tuple[str, str]:
    """(template, source): the file's text and its path when given, else the tokenizer's own ("tokenizer").

    A tokenizer without one, and no file, is a UsageError: there is no neutral way to render turns.
    """
    if template_file is not None:
        try:
            return Path(template_file).read_text(encoding="utf-8"), str(template_file)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --chat_template {template_file}: {first_line(e)}") from e
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if not template:
        raise UsageError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: "
                         "pass --chat_template FILE (a Jinja template)")
    return template, "tokenizer"


def template_identity(template: str, source: str) -> dict:
    """What the manifest records of the template: its sha256 (of the UTF-8 text) and where it came from."""
    return {"sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(), "source": source}


def default_max_len(tokenizer) -> int:
    """The tokenizer's model_max_length where it states one, else DEFAULT_MAX_LEN."""
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 3 <= value <= SANE_MODEL_MAX_LENGTH:
        return value
    return DEFAULT_MAX_LEN


# ---- encoding -----------------------------------------------------------------------------


class ChatEncoder:
    """Conversations to (ids, loss mask, turn starts), with the student's DocumentEncoder for the text.

    tokenizer: the transformers tokenizer of the same folder (its template renderer and added tokens);
    its added tokens below the sentencepiece model's size must be that model's pieces.
    """

    def __init__(self, encoder, tokenizer, template: str):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.template = template
        self.added = added_tokens(tokenizer, encoder.sp)
        self.vocab_size = max(len(tokenizer), encoder.vocab_size)
        longest_first = sorted(self.added, key=len, reverse=True)  # as transformers matches them
        self.special = re.compile("|".join(map(re.escape, longest_first))) if self.added else None
        self.bos_id, self.eos_id, self.unk_id = encoder.bos_id, encoder.eos_id, encoder.unk_id

    def render(self, messages, generation_prompt: bool = False) -> str:
        """The template's text of messages (transformers passes it bos_token, eos_token and the rest)."""
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def pieces(self, conv: Conversation, where: str) -> tuple[list[tuple[str, bool]], list[int]]:
        """The rendered conversation as (text, trained) pieces, and the piece index where each turn starts.

        Renders messages[:k] for every k (and with the generation prompt before each trained message):
        each must extend the one before, or the turns cannot be located (DataError).
        """
        self.check_contents(conv, where)
        pieces, turn_starts, done = [], [], ""
        for k, trained in enumerate(conv.trained):
            turn_starts.append(len(pieces))
            if trained:
                prompt = self._extend(done, conv.messages[:k], True, where)
                pieces.append((prompt[len(done):], False))
                done = prompt
            rendered = self._extend(done, conv.messages[:k + 1], False, where)
            pieces.append((rendered[len(done):], trained))
            done = rendered
        return pieces, turn_starts

    def check_contents(self, conv: Conversation, where: str) -> None:
        """Refuse a content holding an added token's string: the rendered text is cut at those strings, so
        it would be read as that token (a user turning its text into an assistant turn)."""
        for n, m in enumerate(conv.messages, 1):
            found = self.special and self.special.search(m["content"])
            if found:
                raise DataError(f"{where}: message {n} ({m['role']}) holds {found.group()!r}, a special token of "
                                "the tokenizer: text is never read as special tokens, remove it")

    def _extend(self, done: str, messages, generation_prompt: bool, where: str) -> str:
        """The rendering of messages, which must begin with done (the rendering before it)."""
        try:
            text = self.render(messages, generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template can raise anything (raise_exception, jinja errors)
            raise DataError(f"{where}: the chat template fails on it: {first_line(e)}") from None
        if not text.startswith(done):
            what = f"messages[:{len(messages)}]" + (" with the generation prompt" if generation_prompt else "")
            raise DataError(f"{where}: the chat template's rendering of {what} does not begin with that of the "
                            "messages before it, so its turns cannot be told apart: use a --chat_template that "
                            "renders each turn after the previous ones")
        return text

    def encode_text(self, text: str) -> list[int]:
        """Added tokens as their ids; the text between them as DocumentEncoder encodes lines."""
        ids, start = [], 0
        for match in (self.special.finditer(text) if self.special else ()):
            ids += self._plain(text[start:match.start()])
            ids.append(self.added[match.group()])
            start = match.end()
        return ids + self._plain(text[start:])

    def _plain(self, text: str) -> list[int]:
        """Text without special tokens, each line encoded on its own (the newlines are dropped), as
        binarize encodes documents."""
        return [i for line in text.split("\n") if line for i in self.encoder.encode_line(line)]

    def encode(self, conv: Conversation, where: str) -> tuple[list[int], list[int], list[int]]:
        """(ids, mask, turn starts) of the rendered conversation, without a leading <s> the template wrote
        (the sequence's own <s> stands for it); turn starts are token indices, the first 0."""
        pieces, turn_starts = self.pieces(conv, where)
        ids, mask, starts, turn_starts = [], [], [], set(turn_starts)
        for p, (text, trained) in enumerate(pieces):
            if p in turn_starts:
                starts.append(len(ids))
            encoded = self.encode_text(text)
            ids += encoded
            mask += [int(trained)] * len(encoded)
        if ids and ids[0] == self.bos_id:
            ids, mask = ids[1:], mask[1:]
            starts = [max(s - 1, 0) for s in starts]
        return ids, mask, starts


def added_tokens(tokenizer, sp) -> dict[str, int]:
    """The tokenizer's added tokens (special tokens, the template's markers) and their ids; UsageError
    where one below the sentencepiece model's size is not that model's piece (two disagreeing files)."""
    out = {}
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(getattr(token, "content", token))
        if token_id < sp.get_piece_size() and sp.id_to_piece(token_id) != content:
            raise UsageError(f"the tokenizer's token {content!r} has id {token_id}, which is "
                             f"{sp.id_to_piece(token_id)!r} in its sentencepiece model: they disagree")
        out[content] = token_id
    return out


# ---- cutting ------------------------------------------------------------------------------


def cut(ids, mask, turn_starts, max_len: int, bos: int, eos: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list]:
    """Sequences `<s> ... </s>` of at most max_len tokens, cut at turn starts, with their masks.

    Each piece holds as many whole turns as fit (from a turn start on); a turn that does not fit in one
    piece (more than max_len - 2 tokens) is cut at max_len - 2 tokens, and the piece after it goes on
    from there. <s> and an appended </s> are masked 0; no </s> is appended after one the template wrote.
    turn_starts: each message's first token (non-decreasing). Returns (pieces, the cut turns as
    (message index, its tokens)).
    """
    room, bounds = max_len - 2, sorted(set(turn_starts) | {len(ids)})
    pieces, cut_turns, start = [], {}, 0
    while start < len(ids):
        end = bounds[bisect.bisect_right(bounds, start + room) - 1]
        if end <= start:  # the turn from here on does not fit: cut it
            message = bisect.bisect_right(turn_starts, start) - 1
            following = bounds[bisect.bisect_right(bounds, start)]
            cut_turns[message] = following - turn_starts[message]
            end = start + room
        pieces.append(_wrap(ids[start:end], mask[start:end], bos, eos))
        start = end
    return pieces, sorted(cut_turns.items())


def _wrap(ids, mask, bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """[<s>] + ids + [</s>] (no second </s>) as int64, and the mask beside it as uint8."""
    tail = [] if ids and ids[-1] == eos else [eos]
    return (np.asarray([bos, *ids, *tail], dtype=np.int64),
            np.asarray([0, *mask, *([0] * len(tail))], dtype=np.uint8))
