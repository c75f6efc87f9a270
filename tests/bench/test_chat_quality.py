"""bench/chat_quality.py: the next-sentence chat task, chrF against hand-worked values, and the whole chain
at smoke size (the project's sample text)."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, load_script

chat_quality = load_script("bench/chat_quality.py")


def test_chrf_against_hand_worked_values():
    assert chat_quality.chrf("abc", "abc") == pytest.approx(100)
    assert chat_quality.chrf("", "abc") == 0 and chat_quality.chrf("xyz", "abc") == 0
    # "ab" against "abc": order 1 P 2/2 R 2/3, order 2 P 1/1 R 1/2, order 3 absent from the hypothesis;
    # P = 1, R = 7/12, F2 = 5 P R / (4 P + R) = 35/55
    assert chat_quality.chrf("ab", "abc") == pytest.approx(100 * 35 / 55)
    assert chat_quality.chrf("a b", "ab") == pytest.approx(100)  # spaces do not count


def test_pairs_are_consecutive_sentences_of_sane_length():
    paragraph = "今日は朝から雨が降っていた。駅まで傘をさして歩いていった。短い。電車の中では本を読みながら過ごした。"
    assert chat_quality.sentences("甲。乙。丙") == ["甲。", "乙。"]
    assert chat_quality.pairs_of([paragraph]) == [("今日は朝から雨が降っていた。", "駅まで傘をさして歩いていった。")]


@pytest.mark.slow
def test_smoke_size_runs_every_student_and_scores_them(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "chat_quality.py"), "--size", "smoke",
                             "--out_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results-s0.json").read_text())
    assert list(results["models"]) == ["teacher", "sft", "kd", "onpol_0.5", "onpol_1"]
    for name, r in results["models"].items():
        assert 0 < r["bits_per_char"] < 20 and 0 <= r["chrf"] <= 100 and r["answered"] == 8, name
    assert results["models"]["onpol_1"]["generation_share"] > 0  # every step sampled, and the log says so
    assert results["models"]["kd"]["generation_share"] is None
    assert "| onpol_1 |" in result.stdout


def test_missing_corpora_exit_2(tmp_path, capsys):
    assert chat_quality.main(["--size", "tiny", "--corpora", str(tmp_path), "--out_dir", str(tmp_path / "o")]) == 2
    assert "missing corpora" in capsys.readouterr().err
