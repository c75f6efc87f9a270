import os
import time

import pytest
from transformers import AutoTokenizer, T5Tokenizer

from data_prep import make_tokenizer
from distil_ja.outputs import MARKER
from distil_ja.tokenization import DocumentEncoder, iter_documents, load_tokenizer, normalize_text
from data_prep_fixtures import sentence, tiny_tokenizer_dir, training_text

LAYOUT = ["<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def test_train_tokenizer_is_fast_and_small_vocab_ok(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(training_text(n_docs=40), encoding="utf-8")
    t0 = time.time()
    out = make_tokenizer.train_tokenizer(str(path), 2000, str(tmp_path / "tok"))  # more than the text supports
    assert time.time() - t0 < 5
    assert sorted(os.listdir(out)) == [MARKER, "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]


@pytest.mark.parametrize("loader", ["auto", "t5", "project"])
def test_rinna_layout(tok_dir, loader):
    if loader == "auto":
        tok = AutoTokenizer.from_pretrained(tok_dir)
    elif loader == "t5":
        tok = T5Tokenizer.from_pretrained(tok_dir, extra_ids=0)
    else:
        tok = load_tokenizer(tok_dir)
    assert tok.convert_ids_to_tokens(list(range(7))) == LAYOUT
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (4, 5, 6)
    ids = tok("東京は日本の首都である。")["input_ids"]
    assert ids[-1] == 2 and 1 not in ids  # </s> appended, <s> never added


def test_vocabulary_is_lowercase_and_uppercase_is_unknown(tok_dir):
    enc = DocumentEncoder(tok_dir, lowercase=False)
    pieces = [enc.sp.id_to_piece(i) for i in range(7, enc.vocab_size)]
    assert all(p == p.lower() for p in pieces)
    assert enc.unk_id in enc.encode_lines(["ABC"])  # why binarize lowercases
    assert enc.unk_id not in DocumentEncoder(tok_dir).encode_lines(["ABC"])


def test_load_tokenizer_fixes_transformers_unk_id(tok_dir):
    # transformers 5.x builds T5Tokenizer's Unigram with unk_id=2 (T5 layout): in rinna's
    # layout an unknown character would become </s>.  load_tokenizer maps it to <unk>=0.
    tok = load_tokenizer(tok_dir)
    ids = tok("東京で☃を見た")["input_ids"]
    assert 0 in ids and ids.count(2) == 1 and ids[-1] == 2


def test_document_encoder_matches_transformers(tok_dir):
    import random

    rng = random.Random(7)
    lines = [sentence(rng) for _ in range(200)]
    lines += ["ABC社とＡＢＣ社", "  前後に  空白  ", "☃と東京", "xyz 123 wiki", "℡の番号", "a", "。"]
    tok = load_tokenizer(tok_dir)
    enc = DocumentEncoder(tok_dir)
    for line in lines:
        expected = tok(normalize_text(line))["input_ids"]
        assert expected[-1] == tok.eos_token_id
        assert enc.encode_lines([line]) == expected[:-1], line
    both = enc.encode_lines(lines[:2])
    assert both == enc.encode_lines(lines[:1]) + enc.encode_lines(lines[1:2])


def test_encode_document_units(tok_dir):
    enc = DocumentEncoder(tok_dir)
    doc = ["東京は首都である。", "ABC社がある。"]
    (seq,) = enc.encode_document(doc, unit="doc")
    assert seq[0] == 1 and seq[-1] == 2 and 2 not in seq[1:-1] and 1 not in seq[1:]
    assert seq[1:-1] == enc.encode_lines(doc)
    lines = enc.encode_document(doc, unit="line")
    assert [s[1:-1] for s in lines] == [enc.encode_lines([x]) for x in doc]
    assert all(s[0] == 1 and s[-1] == 2 for s in lines)
    assert enc.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    ident = enc.identity()
    assert ident["lowercase"] is True and len(ident["spiece_sha256"]) == 64
    with pytest.raises(ValueError):
        enc.encode_document(doc, unit="para")


def test_iter_documents(tmp_path):
    d = tmp_path / "doc_data"
    d.mkdir()
    (d / "10.txt").write_text("j\n\n", encoding="utf-8")
    (d / "2.txt").write_text("a\nb\n\n\n\nc\n  \nd\ne", encoding="utf-8")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_documents(str(d))) == [["a", "b"], ["c"], ["d", "e"], ["j"]]
    assert list(iter_documents([str(d / "10.txt"), str(d / "2.txt")]))[0] == ["j"]
    with pytest.raises(FileNotFoundError):
        list(iter_documents(str(tmp_path / "missing")))


def test_make_tokenizer_cli_errors(tmp_path, capsys):
    def one_error_line():
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
        return err

    out = str(tmp_path / "o")
    assert make_tokenizer.main(["--input", str(tmp_path / "none.txt"), "--output_dir", out]) == 1
    assert "none.txt" in one_error_line()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert make_tokenizer.main(["--input", str(empty), "--output_dir", out]) == 1
    assert "no text" in one_error_line()
    text = tmp_path / "t.txt"
    text.write_text(training_text(n_docs=20), encoding="utf-8")
    assert make_tokenizer.main(["--input", str(text), "--output_dir", out, "--vocab_size", "4"]) == 2
    assert "--vocab_size" in one_error_line()
    assert make_tokenizer.main(["--input", str(text), "--output_dir", out, "--vocab_size", "5000",
                                "--hard_vocab_limit"]) == 2  # more pieces than the text can give
    assert "sentencepiece" in one_error_line()
    assert make_tokenizer.main(["--input", str(text), "--output_dir", out, "--vocab_size", "200"]) == 0
    assert make_tokenizer.main(["--input", str(text), "--output_dir", out, "--vocab_size", "200"]) == 2
    assert "--overwrite" in one_error_line()


def test_make_tokenizer_truncated_input_is_bad_data(tmp_path, capsys):
    import lzma

    data = lzma.compress(training_text(n_docs=40).encode("utf-8"))
    cut = tmp_path / "cut.txt.xz"
    cut.write_bytes(data[: len(data) // 2])
    assert make_tokenizer.main(["--input", str(cut), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "cut.txt.xz" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
