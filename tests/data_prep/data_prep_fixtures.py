"""Project-written fixtures for the data_prep tests: generated Japanese-like text, a tiny
CirrusSearch dump, a CC-100 style .xz, plain text with awkward content, a truncated archive."""
import gzip
import json
import lzma
import random

NOUNS = ("東京 大阪 京都 日本 学校 先生 学生 電車 駅 公園 図書館 山 川 海 空 猫 犬 本 音楽 映画 料理 天気 "
         "雨 雪 春 夏 秋 冬 朝 夜 友達 家族 会社 仕事 研究 歴史 文化 言語 世界 時間 政治 経済 科学 "
         "技術 大学 病院 新聞 写真 鉄道 自然 地域 人口 首都 作品").split()
PARTICLES = "は が を に で と の も へ から まで".split()
VERBS = ("行きました 見ました 食べました 読みました 書きました 話しました 住んでいます 考えています "
         "歩きました 遊びました ある いる なる 知られる 呼ばれる").split()
LATIN = "abc xyz gpt wiki data model test news web".split()


def sentence(rng, latin=True):
    parts = []
    for _ in range(rng.randint(2, 5)):
        word = rng.choice(NOUNS)
        if latin and rng.random() < 0.15:
            word = rng.choice(LATIN)
        parts.append(word + rng.choice(PARTICLES))
    return "".join(parts) + rng.choice(VERBS) + "。"


def paragraph(rng, n=None):
    return "".join(sentence(rng) for _ in range(n or rng.randint(1, 4)))


def training_text(n_docs=120, seed=0):
    """Blank-line separated documents, one sentence per line, with lowercase Latin words and
    digits, so a tokenizer trained on it knows 'abc'."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = [sentence(rng) for _ in range(rng.randint(2, 6))]
        lines.append(f"{rng.randint(0, 2024)}年に{rng.choice(LATIN)}の研究が行われた。")
        docs.append("\n".join(lines))
    return "\n\n".join(docs) + "\n"


def write_training_text(path, **kw):
    with open(path, "w", encoding="utf-8") as f:
        f.write(training_text(**kw))
    return path


def cirrus_articles(seed=1, n=6):
    rng = random.Random(seed)
    articles = []
    for i in range(n):
        text = (
            f"この項目では、記事{i}について説明しています。その他の用法については「記事{i} (曖昧さ回避)」をご覧ください。"
            f"{rng.choice(NOUNS)}は日本の都市である[1]。人口は多い[要出典]。{{{{基礎情報 都市|名前=x{{{{入れ子}}}}}}}}"
            f"「行くよ。」と彼は言った。ＡＢＣ社のWikiで知られる[注 2]。"
            f"式は {{\\displaystyle x^{{2}}}} である。" + paragraph(rng, 3) + "\tタブ\x07制御。"
            f" 脚注 ^ 出典の本 参考文献 本の名前 外部リンク 公式サイト"
        )
        articles.append({"title": f"記事{i}", "text": text, "namespace": 0})
    articles.append({"title": "空の記事", "text": "{{削除}}", "namespace": 0})
    articles.append({"title": "ノート", "text": "ノートページの本文。", "namespace": 1})
    return articles


def write_cirrus_dump(path, articles=None, bad_json=True):
    """A CirrusSearch content dump: index header line + document line per article."""
    with gzip.open(path, "wb") as f:
        for i, art in enumerate(articles or cirrus_articles()):
            f.write(json.dumps({"index": {"_type": "page", "_id": str(i)}}).encode() + b"\n")
            f.write(json.dumps(art, ensure_ascii=False).encode("utf-8") + b"\n")
        if bad_json:
            f.write(b'{"text": "broken json\n')
    return path


def cc100_bytes(seed=2, n_docs=30):
    """CC-100 layout (paragraph per line, blank line between documents) with bad bytes and
    empty documents (runs of blank lines)."""
    rng = random.Random(seed)
    out = []
    for d in range(n_docs):
        for _ in range(rng.randint(1, 3)):
            out.append(paragraph(rng).encode("utf-8"))
        if d == 3:
            out.append(b"\xff\xfe bad bytes " + "です。".encode("utf-8"))
        out.append(b"")
        if d % 7 == 0:
            out.append(b"")  # an empty document
            out.append(b"   ")
    return b"\n".join(out) + b"\n"


def write_cc100_xz(path, **kw):
    with lzma.open(path, "wb") as f:
        f.write(cc100_bytes(**kw))
    return path


def write_truncated_xz(path, **kw):
    data = lzma.compress(cc100_bytes(**kw) * 5)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def plain_text_bytes(seed=3, long_sentences=400):
    """Documents with uppercase Latin, full-width characters, undecodable bytes, empty
    documents and one document far over 1024 tokens."""
    rng = random.Random(seed)
    docs = [
        "ABCの研究が行われた。\nＡＢＣとＷｉｋｉは学校に行きました。".encode("utf-8"),
        "abcの研究が行われた。\nabcとwikiは学校に行きました。".encode("utf-8"),
        "壊れた".encode("utf-8") + b"\xff\xfe" + "バイト列を含む文。".encode("utf-8"),
        "\n".join(sentence(rng) for _ in range(long_sentences)).encode("utf-8"),
        "".encode("utf-8"),
        paragraph(rng).encode("utf-8"),
    ]
    return b"\n\n".join(docs) + b"\n"  # the empty document shows as an extra blank line


_TOKENIZER_CACHE = {}


def tiny_tokenizer_dir(base_dir, vocab_size=600):
    """Train (once per session and base dir) a tiny rinna-layout tokenizer; returns its dir."""
    import os

    from data_prep.make_tokenizer import train_tokenizer

    key = (str(base_dir), vocab_size)
    if key not in _TOKENIZER_CACHE:
        text = write_training_text(os.path.join(base_dir, "tok_train.txt"))
        _TOKENIZER_CACHE[key] = train_tokenizer(text, vocab_size, os.path.join(base_dir, f"tok{vocab_size}"))
    return _TOKENIZER_CACHE[key]
