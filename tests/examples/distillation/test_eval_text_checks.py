"""Issue 22: evaluate.py and --eval_data apply binarize.py's bad-text rules (distil_ja.text_checks).

Before, the cp932 file that binarize.py refuses was scored silently (perplexity 896 and 990).
"""

import pytest

import train
from conftest import TOKENIZER_TEXT
from helpers import load_script, train_args

HANGUL = "한국어로 쓴 문장입니다. 학교에 갔습니다."  # no Hangul in the tiny tokenizer: <unk>


@pytest.fixture(scope="module")
def cp932_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp932") / "sjis.txt"
    path.write_bytes(("\n\n".join(TOKENIZER_TEXT.splitlines() * 4) + "\n").encode("cp932"))
    return path


@pytest.fixture(scope="module")
def unk_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("unk") / "hangul.txt"
    path.write_text("\n\n".join([HANGUL] * 150) + "\n", encoding="utf-8")
    return path


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("which, words", [("cp932", "are not valid UTF-8"), ("unk", "are <unk> (limit 5%)")])
def test_evaluate_refuses_bad_text_unless_allowed(which, words, cp932_text, unk_text, tiny_setup, tmp_path,
                                                  capsys):
    evaluate = load_script("examples/distillation/evaluate.py")
    data = {"cp932": cp932_text, "unk": unk_text}[which]
    args = ["--model", str(tiny_setup["teacher"]), "--tokenizer", str(tiny_setup["tokenizer"]), "--data", str(data),
            "--device", "cpu", "--max_length", "64"]
    assert evaluate.main(args) == 1
    line = error_line(capsys)
    assert words in line and str(data) in line and "iconv" in line and "--allow_bad_text" in line, line
    assert evaluate.main([*args, "--allow_bad_text", "--json", str(tmp_path / "ppl.json")]) == 0
    assert (tmp_path / "ppl.json").is_file()


def test_eval_data_refuses_bad_text_before_the_dump_path_is_written(cp932_text, tiny_setup, tmp_path, capsys):
    dump = tmp_path / "run"
    assert train.main(train_args(tiny_setup, dump, "--eval_data", str(cp932_text))) == 1
    line = error_line(capsys)
    assert line.startswith("error: --eval_data: ") and "not valid UTF-8" in line and "binarize" in line, line
    assert not dump.exists()
