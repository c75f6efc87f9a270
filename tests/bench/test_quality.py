"""bench/quality.py: the raw text -> tokenizer -> teacher -> three students -> perplexity chain."""

import json
import lzma
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, load_script

QUALITY = REPO / "bench" / "quality.py"


quality = load_script("bench/quality.py")


def path_of(text: str) -> Path:
    """A path as results JSON gives it: relative to the repo when inside it."""
    return Path(text) if Path(text).is_absolute() else REPO / text


def run_quality(*args, timeout=300):
    return subprocess.run([sys.executable, str(QUALITY), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """One --out_dir for the smoke runs of this module: the later ones reuse the tokenizer, data and teacher."""
    return tmp_path_factory.mktemp("smoke") / "quality"


@pytest.mark.slow
def test_smoke_size_gives_four_rows_on_one_token_budget(tmp_path, smoke_out):
    out = smoke_out
    proc = run_quality("--size", "smoke", "--out_dir", out, "--report_dir", tmp_path / "report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "results-default.json").read_text())
    runs = result["runs"]
    assert list(runs) == ["teacher", "no_kd", "kd", "kd_init"]
    for name, row in runs.items():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, name
        assert math.isclose(row["ratio"], row["perplexity"] / runs["teacher"]["perplexity"])
        assert row["wall_s"] > 0 and row["tokens_seen"] > 0
        assert path_of(row["tensorboard"]).is_dir()
    students = [runs[n] for n in ("no_kd", "kd", "kd_init")]
    # one budget: the same steps over the same batches, so exactly the same tokens
    assert len({r["tokens_seen"] for r in students}) == 1
    assert len({r["steps"] for r in students}) == 1
    assert runs["teacher"]["tokens_seen"] > students[0]["tokens_seen"]  # the smoke teacher runs twice the steps
    assert [runs[n]["teacher"] for n in runs] == [False, False, True, True]
    assert runs["kd_init"]["init"] == "teacher layers" and runs["kd"]["init"] == "random"
    # the students' train.py settings really differ only in the losses and the init
    params = {n: json.loads((path_of(runs[n]["path"]) / "parameters.json").read_text()) for n in ("no_kd", "kd", "kd_init")}
    assert params["no_kd"]["alpha_ce"] == 0 and params["no_kd"]["teacher_name"] is None
    recipe = result["recipe"]  # train.py's loss settings (config.RECIPE), the project's default
    for name in ("kd", "kd_init"):
        assert [params[name][k] for k in ("temperature", "alpha_ce", "alpha_clm", "alpha_cos")] == \
            [recipe[k] for k in ("T", "ce", "clm", "cos")]
    assert params["kd_init"]["student_pretrained_weights"].endswith("student_init.pth")
    for key in ("max_steps", "batch_size", "learning_rate", "seed", "data_file"):
        assert len({json.dumps(p[key]) for p in params.values()}) == 1, key

    table = (out / "results-default.md").read_text()
    for name in runs:
        assert f"| {name} |" in table
    assert "ppl ÷ teacher" in table and "tensorboard" in table and "tokens to no-KD ppl" in table
    # bits per character of the dev text beside the perplexity: the same NLL over the text's characters
    details = json.loads((out / "perplexity-default.json").read_text())["details"]
    assert result["dev_chars"] > result["dev_tokens"] / 10 and "dev bits/char" in table
    for name, row in runs.items():
        assert row["bits_per_char"] == pytest.approx(details[name]["nll_sum"] / math.log(2) / result["dev_chars"])
        assert row["bits_per_byte"] == pytest.approx(details[name]["nll_sum"] / math.log(2) / result["dev_bytes"])
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {row['perplexity']:.2f} | {row['bits_per_char']:.4f} |" in line
    assert (tmp_path / "report" / "results-default.json").is_file()
    assert (tmp_path / "report" / "kd" / "log").is_dir()

    # every student was scored during training (smoke: every 2 of its 6 steps), on the dev set
    histories = {n: json.loads((path_of(runs[n]["path"]) / "eval_results.json").read_text())["history"]
                 for n in ("no_kd", "kd", "kd_init")}
    assert all([h["step"] for h in history] == [2, 4, 6] for history in histories.values())
    assert all(h["tokens"] == result["dev_tokens"] and h["chars"] == result["dev_chars"]
               for history in histories.values() for h in history)
    # token efficiency from those curves, against the reference function; no_kd reaches its own final at 1.0
    for name in ("no_kd", "kd", "kd_init"):
        efficiency = runs[name]["token_efficiency"]
        assert efficiency["target_perplexity"] == histories["no_kd"][-1]["perplexity"]
        assert efficiency["budget_tokens"] == histories["no_kd"][-1]["tokens_seen"] == runs["no_kd"]["tokens_seen"]
        reached = reference_tokens_to_reach(histories[name], efficiency["target_perplexity"])
        assert efficiency["tokens"] == (None if reached is None else pytest.approx(reached))
        assert f"| {quality.efficiency_cell(efficiency)} |" in table.split(f"| {name} |")[1].splitlines()[0]
    assert runs["no_kd"]["token_efficiency"]["fraction"] == pytest.approx(1.0)
    assert "token_efficiency" not in runs["teacher"]
    # the students' curves: a PNG shown by the report, copied with it
    png = path_of(result["curves"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({png.name})" in table
    assert (tmp_path / "report" / png.name).read_bytes() == png.read_bytes()
    assert (tmp_path / "report" / "kd" / "curves.png").is_file()  # train.py's own picture of the run
    assert [p.name for p in (out / "text").iterdir()] == ["dev"]  # the training text is deleted once binarized


def fake_corpora(tmp_path):
    """The four corpora the GPU size reads, one sentence each (enough for --dry_run)."""
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    for name in ("jawiki_jaquad_train", "jawiki_jaquad_dev", "jawikinews", "aozora_modern_50MB"):
        (corpora / f"{name}.txt.xz").write_bytes(lzma.compress("文。\n".encode()))
    return corpora


def test_dry_run_gpu_size_commands(tmp_path, capsys):
    corpora = fake_corpora(tmp_path)
    code = quality.main(["--size", "gpu", "--corpora", str(corpora), "--out_dir", str(tmp_path / "q"), "--dry_run",
                         "--recipe", "T=1,ce=0.9,clm=0.1,cos=0", "--student_lr", "1e-3", "--kd_lr", "2e-3"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    stdout = out.out  # as the subprocess printed it: quality.main prints, runs nothing (--dry_run)
    lines = [line for line in stdout.splitlines() if "train.py" in line]
    assert len(lines) == 4  # teacher and three students
    assert all("--n_gpu 1" in line and "--precision bf16" in line for line in lines)
    no_teacher = [line for line in lines if "--teacher_name" not in line]  # the teacher and no_kd
    assert len(no_teacher) == 2 and all("--alpha_ce 0 --alpha_clm 1 --alpha_cos 0" in line for line in no_teacher)
    kd = [line for line in lines if "--teacher_name" in line]
    assert len(kd) == 2 and all("--temperature 1.0 --alpha_ce 0.9 --alpha_clm 0.1 --alpha_cos 0.0 --kd_loss fkl" in line
                                  for line in kd)
    assert sum("--student_pretrained_weights" in line for line in lines) == 1
    assert all("--learning_rate 0.002" in line for line in kd)  # --kd_lr: the distilled students only
    assert sum("--learning_rate 0.001 " in line for line in lines) == 2  # the teacher (gpu size) and no_kd
    assert "evaluate.py" in stdout and "--bf16" in stdout.split("evaluate.py")[1]
    # the re-sized budget: a longer teacher; students scored on the dev set every 200 of their 1,200 steps
    teacher = next(line for line in no_teacher if "teacher.json" in line)
    assert "--max_steps 4200" in teacher and "--eval_data" not in teacher
    students = [line for line in lines if line is not teacher]
    assert all("--max_steps 1200" in line and "--eval_interval 200" in line for line in students)
    dev_text = tmp_path / "q" / "text" / "dev" / "doc_data"  # text, so that bits per character are measured
    assert all(f"--eval_data {dev_text}" in line for line in students)
    assert f"--data {dev_text}" in stdout.split("evaluate.py")[1]


def test_dry_run_within_pieces_dumps_and_trains_with_the_flag(tmp_path, capsys):
    code = quality.main(["--size", "gpu", "--corpora", str(fake_corpora(tmp_path)), "--out_dir", str(tmp_path / "q"),
                         "--dry_run", "--recipe", "cos=0,within=1", "--runs", "no_kd_x,xkd,xkd_top64"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    dump = next(line for line in out.out.splitlines() if "dump_teacher_logits.py" in line)
    assert "--within_pieces" in dump and "top64-T1-x16000-within" in dump
    students = {name: line for line in out.out.splitlines() if "train.py" in line
                for name in ("no_kd_x", "xkd_top64", "xkd") if f"/students/{name}-" in line}
    assert "--within_pieces" in students["xkd"] and "--within_pieces" in students["xkd_top64"]
    assert "--within_pieces" not in students["no_kd_x"] and "top64-T1-x16000-within" in students["xkd_top64"]


@pytest.mark.parametrize("objective", ["taid", "akl"])
def test_dry_run_gpu_size_takes_the_adaptive_objectives(tmp_path, objective, capsys):
    code = quality.main(["--size", "gpu", "--corpora", str(fake_corpora(tmp_path)), "--out_dir", str(tmp_path / "q"),
                         "--dry_run", "--recipe", f"kd={objective}", "--runs", "no_kd,kd,kd_init"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    kd = [line for line in out.out.splitlines() if "train.py" in line and "--teacher_name" in line]
    assert len(kd) == 2 and all(f"--kd_loss {objective} " in line and "--precision bf16" in line for line in kd)


@pytest.mark.slow
def test_smoke_objective_offline_top_k_and_narrower_student(smoke_out):
    """One objective and one top-k offline teacher at cos=0, then a narrower student whose cosine term projects."""
    proc = run_quality("--size", "smoke", "--out_dir", smoke_out, "--runs", "no_kd,kd,kd_top8",
                       "--recipe", "cos=0,kd=rkl", "--tag", "topk")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((smoke_out / "results-topk.json").read_text())
    runs = result["runs"]
    assert list(runs) == ["teacher", "no_kd", "kd", "kd_top8"] and result["recipe"]["kd"] == "rkl"
    assert len({runs[n]["tokens_seen"] for n in ("no_kd", "kd", "kd_top8")}) == 1  # one token budget
    assert all(math.isfinite(runs[n]["perplexity"]) and "token_efficiency" in runs[n] for n in ("kd", "kd_top8"))
    params = {n: json.loads((path_of(runs[n]["path"]) / "parameters.json").read_text()) for n in ("kd", "kd_top8")}
    dump = smoke_out / "teacher_logits" / "top8-T1"
    assert params["kd_top8"]["teacher_logits"] == str(dump) and params["kd_top8"]["teacher_name"] is None
    assert params["kd"]["teacher_name"] == str(smoke_out / "teacher") and params["kd"]["teacher_logits"] is None
    for p in params.values():
        assert (p["kd_loss"], p["alpha_cos"], p["temperature"]) == ("rkl", 0, 1)
    manifest = json.loads((dump / "manifest.json").read_text())
    assert (manifest["top_k"], manifest["temperature"]) == (8, 1)
    table = (smoke_out / "results-topk.md").read_text()
    assert "| kd_top8 | 1x32 | random | top-8 offline | T=1 ce=5 clm=2 cos=0 kd=rkl |" in table

    # a narrower student (the same head size, one head of 16) under the 2 x 32 teacher, with the cosine term
    proc = run_quality("--size", "smoke", "--out_dir", smoke_out, "--runs", "kd", "--student_width", 16,
                       "--tag", "w16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher: unchanged, reused" in proc.stdout  # another student width keeps the teacher
    runs = json.loads((smoke_out / "results-w16.json").read_text())["runs"]
    assert [runs[n]["model"] for n in runs] == ["2x32", "1x16"]
    config = json.loads((smoke_out / "configs" / "student-1x16.json").read_text())
    assert (config["n_embd"], config["n_head"]) == (16, 1)
    kd = path_of(runs["kd"]["path"])
    assert json.loads((kd / "parameters.json").read_text())["alpha_cos"] == quality.DEFAULT_RECIPE["cos"] > 0
    assert "a learned 16 -> 32 projection" in Path(json.loads((smoke_out / "stamps" / f"student_{kd.name}.json")
                                                             .read_text())["log"]).read_text()
    assert math.isfinite(runs["kd"]["perplexity"])  # evaluate.py read the exported student (no projection in it)


def test_recipe_objective_top_k_runs_and_width_are_checked(capsys):
    assert quality.parse_recipe("kd=jsd,cos=0") == {**quality.DEFAULT_RECIPE, "kd": "jsd", "cos": 0.0}
    assert quality.DEFAULT_RECIPE["kd"] == "fkl"  # train.py's default --kd_loss
    assert quality.recipe_text(quality.parse_recipe("kd=tvd")) == "T=1 ce=5 clm=2 cos=1 kd=tvd"
    assert [quality.topk_of(r) for r in ("kd_top8", "kd_top64", "kd", "kd_top0", "kd_top")] == [8, 64, None, None, None]
    tiny = quality.SIZES["tiny"]
    assert quality.narrower(tiny.student, 64) == quality.Model(1, 64, 2)  # heads of 32, as the teacher's
    assert quality.narrower(tiny.student, 48) is None
    assert quality.main(["--size", "smoke", "--recipe", "cos=1", "--runs", "kd,kd_top8"]) == 2
    assert "--recipe cos=0" in capsys.readouterr().err
    assert quality.main(["--size", "smoke", "--student_width", "16", "--runs", "kd_init"]) == 2
    assert "teacher's width" in capsys.readouterr().err
    assert quality.main(["--size", "smoke", "--student_width", "24"]) == 2
    assert "head size" in capsys.readouterr().err
    assert quality.main(["--size", "smoke", "--runs", "kd_top0"]) == 2
    assert "kd_topK" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--size", "smoke", "--recipe", "kd=kl"])
    assert exit_info.value.code == 2 and "kd is one of fkl, rkl" in capsys.readouterr().err


def quality_here(capsys, *args):
    """quality.main in this process: (exit status, stderr); an argparse refusal's SystemExit counts as its status."""
    try:
        code = quality.main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_missing_corpora_and_bad_arguments_exit_2(tmp_path, capsys):
    code, err = quality_here(capsys, "--size", "tiny", "--corpora", tmp_path / "nowhere", "--out_dir", tmp_path / "q")
    assert code == 2 and "--corpora" in err
    code, err = quality_here(capsys, "--size", "smoke", "--recipe", "beta=3", "--out_dir", tmp_path / "q")
    assert code == 2 and "--recipe" in err
    code, err = quality_here(capsys, "--size", "smoke", "--runs", "kd,other", "--out_dir", tmp_path / "q")
    assert code == 2 and "--runs" in err
    assert not (tmp_path / "q").exists()  # refused before anything is written


# ---- token efficiency --------------------------------------------------------------------------

def reference_tokens_to_reach(history, target):
    """Written out again for the tests: the first evaluation at or below target; before it, the log
    perplexity on the straight line between the two evaluations around the crossing."""
    for i, h in enumerate(history):
        if h["perplexity"] <= target:
            if i == 0:
                return h["tokens_seen"]
            a, b = history[i - 1], h
            fraction = math.log(a["perplexity"] / target) / math.log(a["perplexity"] / b["perplexity"])
            return a["tokens_seen"] + fraction * (b["tokens_seen"] - a["tokens_seen"])
    return None


def curve(*points):
    return [{"step": i + 1, "tokens_seen": t, "perplexity": p} for i, (t, p) in enumerate(points)]


def test_tokens_to_reach_interpolates_in_log_perplexity():
    history = curve((100, 800.0), (200, 400.0), (300, 100.0))
    # 200 lies halfway between 400 and 100 in log: half of the way from 200 to 300 tokens
    assert quality.tokens_to_reach(history, 200.0) == (pytest.approx(250.0), True)
    assert quality.tokens_to_reach(history, 400.0) == (200, True)  # reached exactly at an evaluation
    assert quality.tokens_to_reach(history, 900.0) == (100, False)  # reached by the first: an upper bound
    assert quality.tokens_to_reach(history, 50.0) is None  # never reached
    assert quality.tokens_to_reach([{"step": 1, "perplexity": 5.0}], 9.0) is None  # recorded without tokens_seen


def test_token_efficiency_is_a_fraction_of_the_no_kd_budget():
    histories = {"no_kd": curve((100, 900.0), (200, 600.0), (400, 300.0)),
                 "kd": curve((100, 600.0), (200, 200.0), (400, 150.0)),
                 "kd_init": curve((100, 250.0), (200, 120.0), (400, 100.0)),
                 "weak": curve((100, 950.0), (200, 700.0), (400, 500.0))}
    result = quality.token_efficiency(histories)
    expected = {"no_kd": 400.0, "kd": reference_tokens_to_reach(histories["kd"], 300.0), "kd_init": 100, "weak": None}
    for name, tokens in expected.items():
        assert result[name]["target_perplexity"] == 300.0 and result[name]["budget_tokens"] == 400
        assert result[name]["tokens"] == (None if tokens is None else pytest.approx(tokens))
    assert result["kd"]["fraction"] == pytest.approx(expected["kd"] / 400) and 0.25 < result["kd"]["fraction"] < 0.5
    assert [quality.efficiency_cell(result[n]) for n in expected] == \
        ["1.00", f"{expected['kd'] / 400:.2f}", "≤ 0.25", "not reached"]
    assert quality.efficiency_cell(None) == "–"
    assert quality.token_efficiency({"kd": histories["kd"]}) == {}  # no baseline, no efficiency


def write_student(folder, history):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": h["step"], "tokens_seen": h["tokens_seen"], "clm": 7.0 / h["step"]}) + "\n" for h in history))
    (folder / "eval_results.json").write_text(json.dumps({**history[-1], "history": history}))
    return folder


def test_report_without_matplotlib_says_the_plot_was_skipped(tmp_path, monkeypatch):
    """The GPU machine has no matplotlib: the numbers are all there, the picture is named as skipped."""
    students = [("no_kd", write_student(tmp_path / "no_kd", curve((10, 900.0), (20, 500.0)))),
                ("kd", write_student(tmp_path / "kd", curve((10, 700.0), (20, 300.0))))]
    (tmp_path / "curves-t.png").write_bytes(b"an older picture")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    curves = quality.students_curves(tmp_path, "t", students)
    assert curves["png"] is None and curves["note"].startswith("plot skipped: matplotlib cannot be imported")
    assert not (tmp_path / "curves-t.png").exists()
    assert curves["token_efficiency"]["kd"]["fraction"] == pytest.approx(
        reference_tokens_to_reach(curve((10, 700.0), (20, 300.0)), 500.0) / 20)
    text = quality.report_markdown({"title": "T", "notes": "N", "curves": None, "curves_note": curves["note"]}, "|t|")
    assert text.endswith(f"\n\nTraining curves: {curves['note']}.\n") and "pip install matplotlib" in text


def test_report_with_matplotlib_shows_the_picture(tmp_path):
    students = [("no_kd", write_student(tmp_path / "no_kd", curve((10, 900.0), (20, 500.0))))]
    curves = quality.students_curves(tmp_path, "t", students)
    png = path_of(curves["png"])
    assert png == tmp_path / "curves-t.png" and png.read_bytes()[:4] == b"\x89PNG" and curves["note"] == ""
    text = quality.report_markdown({"title": "T", "notes": "N", "curves": curves["png"], "curves_note": ""}, "|t|")
    assert text.endswith("(curves-t.png)\n")


def test_bits_per_char_is_a_column_beside_the_perplexity():
    row = {"model": "1x32", "init": "random", "teacher": False, "recipe_text": "clm only", "lr": 1e-3, "steps": 6,
           "tokens_seen": 100, "wall_s": 1.0, "perplexity": 50.0, "ratio": 1.0, "tensorboard": "log"}
    table = quality.markdown_table({"runs": {"teacher": {**row, "bits_per_char": 3.21987}, "no_kd": row}})
    head, _, teacher, no_kd = table.splitlines()
    cells = [c.strip() for c in head.split("|")]
    column = cells.index("dev bits/char")
    assert cells[column - 1] == "dev ppl"
    assert teacher.split("|")[column].strip() == "3.2199" and no_kd.split("|")[column].strip() == "–"  # not measured


def test_task_accuracy_is_a_column_and_near_chance_is_said():
    def row(acc, se):
        return {"model": "1x32", "init": "random", "teacher": False, "recipe_text": "clm only", "lr": 1e-3,
                "steps": 6, "tokens_seen": 100, "wall_s": 1.0, "perplexity": 50.0, "ratio": 1.0, "tensorboard": "log",
                "tasks": {"jcommonsenseqa": {"acc": acc, "acc_stderr": se, "chance": 0.2}}}

    runs = {"teacher": row(0.35, 0.05), "no_kd": row(0.25, 0.03)}  # 3 standard errors above chance; 1.7
    table = quality.markdown_table({"runs": runs})
    assert "| jcommonsenseqa acc |" in table.splitlines()[0]
    assert "| 0.350 ± 0.050 |" in table and "| 0.250 ± 0.030 ≈ chance |" in table
    tasks = {"jcommonsenseqa": {"prompt_id": "jcommonsenseqa-v1", "data": "valid.json", "n": 100, "chance": 0.2}}
    assert "within two standard errors of chance (≈): no_kd on jcommonsenseqa." in quality.task_notes(runs, tasks)
    runs["teacher"] = row(0.29, 0.05)
    assert "every model is within two standard errors of chance" in quality.task_notes(runs, tasks)
    assert quality.task_notes(runs, {}) == ""
    assert quality.parse_task_data("jnli=a.json, jcommonsenseqa=b.json") == \
        [("jnli", Path("a.json").resolve()), ("jcommonsenseqa", Path("b.json").resolve())]
