"""Text cleaning (rinna-style, for Wikipedia CirrusSearch text) and a rule-based sentence splitter.

Sentence splitting: rinna split Wikipedia with MeCab; fugashi + unidic-lite would do that
here but runs at a few hundred KB/s.  ``split_sentences`` is a rule-based splitter instead
(tested in tests/data_prep/test_text_clean.py): it splits after 。 (and ！？!? when they end
Japanese text or are followed by a space), keeps closing brackets/quotes with their sentence,
and never splits inside a *matched* bracket or quote pair (「…。」 『…』 (…) 【…】 …), so
``「行くよ。」と彼は言った。`` stays one sentence.  Unmatched brackets are ignored, so a
stray 「 cannot swallow the rest of a paragraph.
"""
import re
import unicodedata

# ----------------------------------------------------------------------------------------
# normalization

# C0/C1 controls (tab/newline become spaces), zero-width and bidi format characters, BOM.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffe]")
_SPACE_RE = re.compile(r"\s+")


def normalize_line(text):
    """NFKC, control/format characters removed, whitespace collapsed and stripped."""
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL_RE.sub("", text)
    return _SPACE_RE.sub(" ", text).strip()


# ----------------------------------------------------------------------------------------
# Wikipedia (CirrusSearch "text" field) cleaning, applied after normalize_line (so brackets
# and digits are ASCII already)

_CITATION_RE = re.compile(
    r"\[(?:\d+(?:[,-]\d+)*|注(?:釈)? ?\d+|[a-z]|脚注 ?\d+|(?:要|リンク切れ|いつ|どこ|誰|どの|どれ|疑問点|"
    r"独自研究|信頼性|出典|訳語|曖昧|不適切|検証|非公式|言葉を濁さない|専門家|全国区)[^\[\]]{0,24})\]"
)
_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
_TEMPLATE_LEFTOVER_RE = re.compile(r"\{\{|\}\}")
# "Parent > Child > Page" navigation at the very start of the text.
_BREADCRUMB_RE = re.compile(r"^(?:[^\s>。]{1,40} ?> ?)+")
# hatnotes at the start: 「この項目では…」「…をご覧ください。」「…を参照。」
_HATNOTE_RE = re.compile(
    r"^(?:[^。]{0,300}?(?:について説明しています|をご覧ください|を参照してください|を参照|"
    r"はこの項目へ転送されています|とは異なります)。 ?)+"
)
# footnote / reference / see-also tails that CirrusSearch flattens into the text.
_TAIL_RE = re.compile(r" (?:脚注|注釈|出典|参考文献|関連項目|外部リンク|関連文献) (?=\S)| \^ ")
MATH_MARKERS = ("\\displaystyle", "\\mathrm", "\\frac{")


def clean_wiki_text(text):
    """rinna-style cleaning of one article's flattened text; returns one cleaned string."""
    text = normalize_line(text)
    previous = None
    while previous != text:  # nested templates
        previous = text
        text = _TEMPLATE_RE.sub("", text)
    text = _TEMPLATE_LEFTOVER_RE.sub("", text)
    text = _CITATION_RE.sub("", text)
    text = _BREADCRUMB_RE.sub("", text)
    text = _HATNOTE_RE.sub("", text)
    tail = _TAIL_RE.search(text)
    if tail and tail.start() > 0:
        text = text[: tail.start()]
    return _SPACE_RE.sub(" ", text).strip()


def has_math(sentence):
    return any(marker in sentence for marker in MATH_MARKERS)


# ----------------------------------------------------------------------------------------
# sentence splitting

OPEN_TO_CLOSE = {"「": "」", "『": "』", "(": ")", "（": "）", "【": "】", "〈": "〉", "《": "》",
                 "[": "]", "〔": "〕", "“": "”", "｛": "｝", "{": "}"}
CLOSERS = set(OPEN_TO_CLOSE.values())
_TERMINATORS = "。！？!?"
_EVENT_RE = re.compile("[" + re.escape("".join(OPEN_TO_CLOSE) + "".join(CLOSERS) + _TERMINATORS + "．") + "]")
# characters after which a half-width ! or ? ends a sentence (kana, kanji, long vowel mark)
_JA_CHAR_RE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\u30fc]")


def _matched_depths(text, events):
    """Positions of matched openers/closers (unmatched ones are ignored)."""
    stack = []
    matched = set()
    for m in events:
        ch = m.group()
        pos = m.start()
        if ch in OPEN_TO_CLOSE:
            stack.append((ch, pos))
        elif ch in CLOSERS:
            for k in range(len(stack) - 1, -1, -1):
                if OPEN_TO_CLOSE[stack[k][0]] == ch:
                    matched.add(stack[k][1])
                    matched.add(pos)
                    del stack[k:]
                    break
    return matched


def split_sentences(text):
    """Split a normalized paragraph into sentences (see module docstring)."""
    if not text:
        return []
    events = list(_EVENT_RE.finditer(text))
    if not events:
        return [text.strip()] if text.strip() else []
    matched = _matched_depths(text, events)
    sentences = []
    start = 0
    depth = 0
    n = len(text)
    for m in events:
        ch = m.group()
        pos = m.start()
        if pos < start:
            continue  # consumed as part of a terminator run
        if ch in OPEN_TO_CLOSE:
            if pos in matched:
                depth += 1
            continue
        if ch in CLOSERS:
            if pos in matched:
                depth -= 1
            continue
        if depth > 0 or ch == "．":
            continue
        if ch in "!?":
            nxt = text[pos + 1] if pos + 1 < n else ""
            prev = text[pos - 1] if pos > 0 else ""
            if not (nxt == "" or nxt == " " or nxt in _TERMINATORS or _JA_CHAR_RE.match(prev)):
                continue
        end = pos + 1
        while end < n and text[end] in _TERMINATORS:  # 。。 !? …
            end += 1
        while end < n and text[end] in CLOSERS and end not in matched:  # stray closer after 。
            end += 1
        sentence = text[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences
