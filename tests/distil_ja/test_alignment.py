"""distil_ja/alignment.py: offsets worked out by hand, tokenizations checked against the text they
spell, the shared vocabulary against each tokenizer's own decoding, and binarize.py --teacher_tokenizer
read back."""

import json
import types

import numpy as np
import pytest

from distil_ja import alignment, shards
from distil_ja.alignment import TeacherEncoder, align, normalised_offsets
from distil_ja.cli import DataError, UsageError
from distil_ja.tokenization import DocumentEncoder, load_tokenizer, normalize_text


# ---- offsets and the alignment, by hand --------------------------------------------------------


@pytest.mark.parametrize("line, norm, at", [
    ("Tokyo", "tokyo", [0, 1, 2, 3, 4, 5]),                  # lowercasing keeps lengths
    ("ＡＢ", "ab", [0, 1, 2]),                                 # full-width to ASCII, one to one
    ("㍻元年", "平成元年", [0, -1, 1, 2, 3]),                 # one character becomes two: no end inside
    ("ｶﾞｷﾞ", "ガギ", [0, 2, 4]),                              # half-width kana + sound mark compose
    ("e\u0301x", "\u00e9x", [0, 2, 3]),                       # a combining accent composes
    ("", "", [0]),
])
def test_normalised_offsets_map_back_to_the_original_line(line, norm, at):
    got_norm, got_at = normalised_offsets(line, normalize_text)
    assert got_norm == norm and got_at.tolist() == at


def test_align_keeps_the_last_of_equal_ends_and_boundaries_both_sides_have():
    # "今日は雨": student <s> ▁ 今日 は 雨 </s>; teacher <bos> 今 日は 雨 <eos> (the module docstring)
    student = np.array([0, 0, 2, 3, 4, -1])
    teacher = np.array([0, 1, 3, 4, -1])
    assert align(student, teacher).tolist() == [-1, 0, -1, 2, 3, -1]  # 今日|は: only the student cuts at 2
    assert align(student, np.array([1, 3, 4, -1])).tolist() == [-1, -1, -1, 1, 2, -1]  # no bos: <s> aligns nowhere
    # a teacher with its own "▁" after <bos>: that one, the last ending at 0, predicts 今
    assert align(student, np.array([0, 0, 1, 3, 4, -1])).tolist() == [-1, 1, -1, 3, 4, -1]


def test_within_pieces_gives_the_depth_into_the_teachers_next_piece():
    # text "今日は雨"; student <s> ▁ 今 日 は 雨 </s>; teacher <bos> 今日は 雨 <eos> (ids 7, 8)
    surfaces = [None] * 10
    surfaces[7], surfaces[8] = "今日は", "雨"
    s_ends, t_ends, t_ids = np.array([0, 0, 1, 2, 3, 4, -1]), np.array([0, 3, 4, -1]), [1, 7, 8, 2]
    found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, surfaces, alignment.align(s_ends, t_ends))
    assert found.tolist() == [-1, 0, 0, 0, 1, 2, -1]  # 今 and 日: the bos row, whose next piece is 今日は
    assert depth.tolist() == [0, 0, 1, 2, 0, 0, 0]


def test_within_pieces_counts_a_dummy_space_and_skips_what_it_cannot_place():
    surfaces = [None] * 10
    surfaces[7], surfaces[8], surfaces[9] = " 今日は", "平成元", "雨"
    # a sentencepiece teacher's first piece "▁今日は": one character longer than the text it covers
    s_ends, t_ends, t_ids = np.array([0, 1, 2, 3, -1]), np.array([3, -1]), [7, 2]
    found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, surfaces, alignment.align(s_ends, t_ends))
    assert found.tolist() == [-1, -1, -1, 0, -1] and depth.tolist() == [0] * 5  # no row before the first piece
    s_ends, t_ends, t_ids = np.array([0, 1, 2, 3, -1]), np.array([0, 3, -1]), [1, 7, 2]
    found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, surfaces, alignment.align(s_ends, t_ends))
    assert found.tolist() == [0, 0, 0, 1, -1] and depth.tolist() == [0, 2, 3, 0, 0]  # 今 is 2 into " 今日は"
    # "元㍻" read as "元平成" (3 characters for 2): the length changed, no depth is sure
    s_ends, t_ends, t_ids = np.array([0, 1, 2, -1]), np.array([0, 2, -1]), [1, 8, 2]
    found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, surfaces, alignment.align(s_ends, t_ends))
    assert found.tolist() == [0, -1, 1, -1] and depth.tolist() == [0, 0, 0, 0]
    # a piece after a position that ends inside a character (-1), and a depth beyond MAX_DEPTH
    s_ends, t_ends, t_ids = np.array([0, 1, 2, -1]), np.array([0, -1, 2, -1]), [1, 9, 9, 2]
    found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, surfaces, alignment.align(s_ends, t_ends))
    assert found.tolist() == [0, -1, 2, -1] and depth.tolist() == [0, 0, 0, 0]
    surfaces[9] = "あ" * 20
    s_ends, t_ends, t_ids = np.array([0, 5, 16, 20, -1]), np.array([0, 20, -1]), [1, 9, 2]
    found, depth = alignment.within_pieces(s_ends, t_ends, t_ids, surfaces, alignment.align(s_ends, t_ends))
    assert found.tolist() == [0, 0, -1, 1, -1] and depth.tolist() == [0, 5, 0, 0, 0]


def test_within_piece_tables_group_the_pieces_that_extend_a_prefix(tiny_tokenizer, tiny_bpe_tokenizer):
    student, teacher = load_tokenizer(str(tiny_tokenizer)), load_tokenizer(str(tiny_bpe_tokenizer))
    s_cls, t_cls, n = alignment.next_character_classes(student, teacher)
    prefix, classes, cut, exact = alignment.within_piece_tables(teacher, t_cls, n)
    texts = alignment.piece_texts(teacher)
    assert prefix.shape == classes.shape == cut.shape == exact.shape == (alignment.MAX_DEPTH + 1, len(teacher))
    assert (prefix[0] == 0).all() and (classes[0] == t_cls).all()
    firsts = {}  # a class's character, read off the student's pieces at depth 0
    for cls, text in zip(s_cls, alignment.piece_texts(student)):
        if cls > 1:
            firsts[int(cls)] = text.lstrip(" ")[0]
    checked = cuts = attached = 0
    for k in (1, 2):
        for i, text in enumerate(texts):
            if text is None or len(text) <= k:  # no piece after the first k characters
                assert cut[k, i] == -1
            else:  # the lowest id whose surface is those k characters, if any
                equal = [j for j, t in enumerate(texts) if t == text[:k]]
                assert cut[k, i] == (equal[0] if equal else -1)
                attached += bool(equal)
            if text is None or len(text) < k:
                assert prefix[k, i] == -1
                continue
            same = [j for j, t in enumerate(texts) if t is not None and len(t) >= k and t[:k] == text[:k]]
            assert np.flatnonzero(prefix[k] == prefix[k, i]).tolist() == same
            if len(text) == k:  # the piece that ends with those k characters: CUT, one past the classes
                assert classes[k, i] == n
                cuts += 1
                continue
            rest = text[k:].lstrip(" ")
            if classes[k, i] > 1:
                assert rest[0] == firsts[int(classes[k, i])]
                checked += 1
            else:
                assert not rest or rest[0] not in firsts.values()
    assert checked > 5 and cuts > 5 and attached > 5 and (classes[1:] <= n).all() and (cut[0] == -1).all()


def test_teacher_ends_from_offsets_when_the_pieces_do_not_spell_the_text():
    # a sentencepiece "▁" smeared over the next character ends where it starts; a piece overlapping the
    # next (part of a character's bytes) or an empty one ends nowhere
    offsets = [(0, 1), (0, 1), (1, 3), (2, 4), (4, 4), (4, 5)]
    pieces = ["\u2581", "今", "日は", "雨x", "", "y"]
    assert alignment._ends_from_offsets(offsets, pieces).tolist() == [0, 1, -1, 4, -1, 5]


def test_piece_bytes():
    assert alignment.piece_bytes("\u2581今日", byte_level=False) == " 今日".encode()
    assert alignment.piece_bytes("<0xE7>", byte_level=False) == b"\xe7"
    assert alignment.piece_bytes("Ġä»Ĭ", byte_level=True) == " 今".encode()
    assert alignment.piece_bytes("今", byte_level=True) is None  # not in the byte alphabet


# ---- real tokenizers: what the aligned prefixes spell -------------------------------------------

DOCUMENT = ["今日はPythonで計算を速くする方法を学んだ。", "駅ビルの本屋は週末とても混む。", "犬と猫 GPU 2026年"]


def test_teacher_pieces_spell_the_text_up_to_each_end(tiny_bpe_tokenizer):
    """Byte-level BPE (cased, no bos): decoding the ids up to a position with an end gives the text up
    to that end; a character the BPE splits into bytes ends only at its last byte."""
    teacher = TeacherEncoder(tiny_bpe_tokenizer)
    text = "\n".join(DOCUMENT)
    ids, ends = teacher.encode(text)
    tok = teacher.tokenizer
    assert (ends >= 0).sum() > len(ends) // 2
    for j, end in enumerate(ends):
        if end >= 0:
            assert tok.decode(ids[: j + 1]) == text[:end], j
    split = [j for j, end in enumerate(ends) if end < 0]
    assert split, "犬 is not in the BPE's training text: its bytes are separate pieces"
    t_ids, t_ends = teacher.sequence(text)
    assert t_ids[-1] == tok.eos_token_id and t_ends[-1] == -1 and len(t_ids) == len(ids) + 1  # no bos


def test_a_sentencepiece_teacher_drops_its_dummy_space(tiny_tokenizer):
    teacher = TeacherEncoder(tiny_tokenizer)
    text = "今日は朝から雨"
    ids, ends = teacher.encode(text)
    assert teacher.tokenizer.convert_ids_to_tokens(ids)[0] == "\u2581" and ends[0] == 0
    assert ends.tolist() == list(range(len(text) + 1))
    for j, end in enumerate(ends):
        assert teacher.tokenizer.decode(ids[: j + 1]) == text[:end]


def test_a_teacher_of_rinnas_recipe_reads_the_text_normalised_as_it_was_trained(tiny_tokenizer):
    """A teacher tokenizer that declares do_lower_case (make_tokenizer.py's, rinna's) gets NFKC + lowercase text,
    as its training data was (binarize.py) and as evaluate.py feeds it; its ends are offsets of the original."""
    teacher = TeacherEncoder(tiny_tokenizer)
    assert teacher.lowercase
    text = "ＰＹＴＨＯＮで（計算）した。Gpu"
    ids, ends = teacher.encode(text)
    assert ids == teacher.tokenizer(normalize_text(text), add_special_tokens=False)["input_ids"]
    assert ends[-1] == len(text)
    for j, end in enumerate(ends):
        if end >= 0 and teacher.tokenizer.unk_token_id not in ids[: j + 1]:
            assert teacher.tokenizer.decode(ids[: j + 1]) == normalize_text(text[:end]), j


def test_student_ids_equal_the_encoders_and_end_where_their_text_does(tiny_tokenizer):
    enc = DocumentEncoder(str(tiny_tokenizer))
    lines = ["ＰＹＴＨＯＮで計算した。", "Ｇｐｕの駅"]
    encoded = alignment.student_lines(enc, lines)
    assert [ids for ids, _ in encoded] == enc.encode_batch(lines)
    for (ids, ends), line in zip(encoded, lines):
        for i, end in enumerate(ends):
            if end >= 0 and enc.unk_id not in ids[: i + 1]:  # its pieces up to i spell the normalised prefix
                assert enc.sp.decode(ids[: i + 1]) == normalize_text(line[:end]), (line, i)
    ends = alignment.student_sequence_ends(encoded, lines)
    assert ends[0] == 0 and ends[-1] == -1 and len(ends) == sum(len(ids) for ids, _ in encoded) + 2
    first_line_end = len(encoded[0][0])  # the last piece of line 1 ends after its newline
    assert ends[first_line_end] == len(lines[0]) + 1


def test_byte_fallback_pieces_end_only_at_the_last_byte(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("今日は雨が降った。\n明日は晴れる。\n" * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=300,
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    encoder = types.SimpleNamespace(sp=sp, preprocess=lambda line: line, num_threads=1)
    [(ids, ends)] = alignment.student_lines(encoder, ["雨犬"])
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces[-3:] == ["<0xE7>", "<0x8A>", "<0xAC>"]  # 犬 is not in the vocabulary: three bytes
    kept = align(ends, np.array([0, 1, 2]))
    assert kept[-1] == 2 and (kept[-3:-1] == -1).all()  # the last byte's position predicts what follows 犬


# ---- vocabularies ------------------------------------------------------------------------------


def test_shared_vocabulary_pairs_pieces_that_read_the_same(tiny_tokenizer, tiny_bpe_tokenizer):
    student, teacher = load_tokenizer(str(tiny_tokenizer)), load_tokenizer(str(tiny_bpe_tokenizer))
    s_ids, t_ids = alignment.shared_vocabulary(student, teacher)
    assert len(set(s_ids.tolist())) == len(s_ids) == len(set(t_ids.tolist())) > 20  # one to one
    assert (student.eos_token_id, teacher.eos_token_id) in set(zip(s_ids.tolist(), t_ids.tolist()))
    special_s, special_t = set(student.all_special_ids), set(teacher.all_special_ids)
    for s, t in zip(s_ids.tolist(), t_ids.tolist()):
        if s in special_s:
            assert t in special_t
            continue
        s_text = student.convert_ids_to_tokens(s).replace("\u2581", " ")  # sentencepiece's space mark
        assert s_text == teacher.decode([t]) and s_text, (s, t)  # the byte-level BPE's own decoder


def test_same_vocabulary_compares_contents_not_sizes(tiny_tokenizer, tiny_bpe_tokenizer, tmp_path):
    a = load_tokenizer(str(tiny_tokenizer))
    assert alignment.same_vocabulary(a, load_tokenizer(str(tiny_tokenizer)))
    assert not alignment.same_vocabulary(a, load_tokenizer(str(tiny_bpe_tokenizer)))
    renamed = tmp_path / "renamed"  # the same size, one piece spelled differently
    a.save_pretrained(renamed)
    config = json.loads((renamed / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    vocab[10][0] = vocab[10][0] + "x"
    (renamed / "tokenizer.json").write_text(json.dumps(config))
    b = load_tokenizer(str(renamed))
    assert len(b) == len(a) and not alignment.same_vocabulary(a, b)
    assert alignment.tokenizer_identity(a, "a")["sha256"] != alignment.tokenizer_identity(b, "b")["sha256"]


def test_a_teacher_tokenizer_without_eos_is_refused(tmp_path, tiny_bpe_tokenizer):
    tok = load_tokenizer(str(tiny_bpe_tokenizer))
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(UsageError, match="defines no end-of-text token"):
        TeacherEncoder(tmp_path / "no_eos")


# ---- binarize.py --teacher_tokenizer -----------------------------------------------------------


@pytest.fixture(scope="module")
def pair_corpus(tmp_path_factory, tiny_tokenizer, tiny_bpe_tokenizer):
    from conftest import TOKENIZER_TEXT
    from data_prep.binarize import binarize

    folder = tmp_path_factory.mktemp("pair")
    text = folder / "text.txt"
    lines = TOKENIZER_TEXT.strip().splitlines()
    text.write_text("\n\n".join("\n".join(lines[i:i + 2]) for i in range(0, len(lines), 2)) + "\n", encoding="utf-8")
    binarize([str(text)], str(tiny_tokenizer), str(folder / "doc"), num_workers=2, progress=False,
             teacher_tokenizer=str(tiny_bpe_tokenizer))
    binarize([str(text)], str(tiny_tokenizer), str(folder / "line"), num_workers=1, progress=False, unit="line",
             teacher_tokenizer=str(tiny_bpe_tokenizer))
    docs = [d.split("\n") for d in text.read_text(encoding="utf-8").strip().split("\n\n")]
    return {"folder": folder, "text": text, "docs": docs, "lines": lines}


@pytest.mark.parametrize("unit", ["doc", "line"])
def test_binarize_writes_teacher_ids_and_alignment_that_spell_the_same_text(pair_corpus, tiny_bpe_tokenizer, unit):
    folder = pair_corpus["folder"] / unit
    manifest = shards.load_manifest(folder)
    sequences, _, extras = shards.load_sequences([folder], extras=("teacher_ids", "alignment", "depth"))
    texts = ["\n".join(d) for d in pair_corpus["docs"]] if unit == "doc" else pair_corpus["lines"]
    assert len(sequences) == len(texts) == manifest["totals"]["sequences"]
    teacher = load_tokenizer(str(tiny_bpe_tokenizer))
    surfaces = alignment.piece_texts(teacher)
    aligned = within = 0
    for seq, t_ids, a, d, text in zip(sequences, extras["teacher_ids"], extras["alignment"], extras["depth"], texts):
        assert len(a) == len(d) == len(seq) and a[-1] == -1 and d.dtype == np.uint8
        assert teacher.decode(t_ids.tolist()[:-1]) == text  # the teacher read the text as it was
        assert not np.any(d[a < 0])
        for i in np.flatnonzero(a >= 0):
            prefix = teacher.decode(t_ids[: a[i] + 1].tolist())
            assert text.startswith(prefix), (i, prefix)
            if d[i] == 0:
                aligned += 1
                continue
            # inside the next teacher piece: its first d characters are the text that follows, and it is longer
            piece = surfaces[t_ids[a[i] + 1]]
            assert 1 <= d[i] < len(piece) and text[len(prefix):].startswith(piece[: d[i]]), (i, piece, d[i])
            within += 1
    totals = manifest["totals"]
    assert totals["aligned"] == aligned and 0.5 < totals["aligned_share"] <= totals["boundary_agreement"] <= 1
    assert totals["within"] == within > 0 and totals["within_share"] == pytest.approx(within / totals["alignable"])
    assert totals["boundary_agreement"] == pytest.approx(
        totals["aligned"] / min(totals["alignable"], sum(len(t) - 1 for t in extras["teacher_ids"])))
    assert manifest["teacher_tokenizer"]["vocab_size"] == len(teacher)


def test_binarize_without_a_teacher_tokenizer_writes_no_extras(pair_corpus, tiny_tokenizer):
    from data_prep.binarize import binarize

    out = pair_corpus["folder"] / "plain"
    manifest = binarize([str(pair_corpus["text"])], str(tiny_tokenizer), str(out), num_workers=1, progress=False)
    assert "teacher_tokenizer" not in manifest and "extras" not in manifest["shards"][0]
    paired, _ = shards.load_sequences([pair_corpus["folder"] / "doc"])
    plain, _ = shards.load_sequences([out])
    assert [s.tolist() for s in paired] == [s.tolist() for s in plain]  # the student's ids are the same


def test_a_pair_that_aligns_too_rarely_is_refused(pair_corpus, tiny_tokenizer, tiny_bpe_tokenizer, monkeypatch,
                                                 tmp_path, capsys):
    from data_prep import binarize

    monkeypatch.setattr(alignment, "MIN_BOUNDARY_AGREEMENT", 0.999)
    code = binarize.main(["--input", str(pair_corpus["text"]), "--tokenizer", str(tiny_tokenizer), "--output_dir",
                          str(tmp_path / "out"), "--teacher_tokenizer", str(tiny_bpe_tokenizer), "--num_workers", "1",
                          "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "of the boundaries agree" in err[-1]
    assert not (tmp_path / "out" / shards.MANIFEST).exists()
    with pytest.raises(DataError):
        shards.load_manifest(tmp_path / "out")
