"""The table that ends bench/gpu_check.sh: one row per measurement, whatever happened to its step.

    python bench/gpu_check_table.py --mode gpu --work TMP --out OUT --budget 470   (gpu_check.sh calls it)

Reads what gpu_check.sh left in its work folder: status.tsv (a line per step: name, exit status or
`skipped`, seconds, limit or reason), the JSON of each distill_step.py run, and the train.py runs'
logs (their `step N/M | ... | X tok/s` lines and the `Recompiling function` lines of TORCH_LOGS=recompiles)
and tensorboard files (global/padding_fraction, global/memory_gib). Writes OUT/results.json and
OUT/summary.md, then prints the table last.
"""

import argparse
import json
import re
import struct
import sys
from pathlib import Path

# (step, side in distill_step.py's JSON or None for a train.py run, what ran)
ROWS = (
    ("a_bs8", "reference", "(a) reference: 2019 step, fp32, eager, masked_select"),
    ("a_bs8", "project", "(a) project: Distiller step"),
    ("b_bs16", "project", "(b) project: Distiller step"),
    ("b_bs32", "project", "(b) project: Distiller step"),
    ("c_plain_bs8", "project", "(c) project, --no-fused_loss"),
    ("d_train_pad64", None, "(d) train.py on the shards, --pad_multiple 64 (default)"),
    ("c_train_pad1", None, "(c) train.py on the shards, --pad_multiple 1"),
)
LOG_LINE = re.compile(r"step (\d+)/(\d+) \|.*\| (\d+) tok/s\s*$")


def read_status(work: Path) -> dict:
    steps = {}
    for line in (work / "status.tsv").read_text().splitlines():
        name, code, seconds, detail = (line.split("\t") + ["", "", ""])[:4]
        steps[name] = {"exit": None if code == "skipped" else int(code), "seconds": int(seconds or 0),
                       "limit_or_reason": detail}
    return steps


def status_text(entry) -> str:
    if entry is None:
        return "not run"
    if entry["exit"] is None:
        return f"skipped: {entry['limit_or_reason']}"
    if entry["exit"] in (124, 137):
        return f"timeout ({entry['limit_or_reason']} s)"
    return "ok" if entry["exit"] == 0 else f"failed (exit {entry['exit']})"


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the tfevents files in folder (TFRecord framing, tensorboardX's Event protobuf)."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        return {}
    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def train_result(work: Path, name: str) -> dict | None:
    log = work / f"{name}.err"
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    windows = [(int(m[1]), int(m[3])) for m in map(LOG_LINE.search, text.splitlines()) if m]
    pad = name.rsplit("pad", 1)[1]
    run = work / f"run_pad{pad}"
    scalars = tensorboard_scalars(run / "log")
    params = json.loads((run / "parameters.json").read_text()) if (run / "parameters.json").exists() else {}
    padding = [v for _, v in scalars.get("global/padding_fraction", [])]
    memory = [v for _, v in scalars.get("global/memory_gib", [])]
    steady = [tps for _, tps in windows[1:]] or [tps for _, tps in windows]
    max_len = re.search(r"splitting to max_len (\d+)", text)
    return {
        "windows": windows,  # (last step of the window, tokens/s)
        "tokens_per_s": sum(steady) / len(steady) if steady else None,  # the windows after the first (compilation)
        "padding_fraction": sum(padding) / len(padding) if padding else None,
        "peak_gib": max(memory) if memory else None,
        "recompiles": text.count("Recompiling function"),
        "recompile_limit_hits": len(re.findall(r"hit config\.(recompile|cache_size)_limit", text)),
        "batch_size": params.get("batch_size"), "max_len": int(max_len[1]) if max_len else None,
        "pad_multiple": params.get("pad_multiple"),
        "precision": params.get("precision"), "compile": params.get("compile"),
    }


def fmt(value, spec, unit=""):
    return "–" if value is None else f"{value:{spec}}{unit}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--work", required=True, help="gpu_check.sh's work folder.")
    parser.add_argument("--out", required=True, help="Where results.json and summary.md go.")
    parser.add_argument("--budget", type=int, required=True, help="The script's time budget, seconds.")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)

    steps = read_status(work)
    benches = {}
    for name in {r[0] for r in ROWS if r[1]}:
        path = work / f"{name}.json"
        if path.exists():
            benches[name] = json.loads(path.read_text())
    trains = {r[0]: train_result(work, r[0]) for r in ROWS if r[1] is None}
    bench_bs8 = next((r["tokens_per_s"] for r in benches.get("a_bs8", {}).get("results", [])
                      if r["name"] == "project"), None)

    rows = []
    for name, side, what in ROWS:
        entry, status = steps.get(name), status_text(steps.get(name))
        row = {"step": name, "what": what, "batch": "–", "tokens_per_s": None, "mfu": None, "peak_gib": None,
               "seconds": entry["seconds"] if entry else None, "status": status, "notes": ""}
        if side is not None:
            bench = benches.get(name, {})
            result = next((r for r in bench.get("results", []) if r["name"] == side), None)
            if result is not None:
                settings = bench.get("project_settings", {})
                if side == "project":
                    row["what"] += " (" + ", ".join([settings.get("precision", "?"), "fused loss" if settings.get(
                        "fused_loss", True) else "whole logits"] + (["compile"] if settings.get("compile") else [])) + ")"
                row.update(batch="{} × {}".format(*bench["batch"]), tokens_per_s=result["tokens_per_s"],
                           mfu=result["mfu"], peak_gib=result["peak_gib"])
                notes = []
                if side == "project" and result.get("gpu_busy"):
                    notes.append(f"GPU busy {100 * result['gpu_busy']['busy']:.0f}% (profile)")
                if side == "project" and bench.get("match") is not None:
                    notes.append("losses match the reference" if bench["match"] else "LOSSES DIFFER from the reference")
                if side == "project" and name != "a_bs8" and bench_bs8:
                    notes.append(f"{result['tokens_per_s'] / bench_bs8:.2f}× a's project step")
                row["notes"] = "; ".join(notes)
            elif status == "ok":
                row["status"] = "failed (no result)"
        else:
            train = trains.get(name)
            if train and train["windows"]:
                row.update(batch=f"{train['batch_size'] or '?'} × ≤ {train['max_len'] or '?'}",
                           tokens_per_s=train["tokens_per_s"], peak_gib=train["peak_gib"])
                notes = ["windows " + " / ".join(f"{tps:,}" for _, tps in train["windows"]) + " tok/s"
                         + (" (the first compiles)" if train["compile"] else "")]
                notes.append(f"padding {fmt(None if train['padding_fraction'] is None else 100 * train['padding_fraction'], '.1f', '%')}")
                notes.append(f"{train['recompiles']} recompiles" + (f", recompile limit hit {train['recompile_limit_hits']}×"
                                                                    if train["recompile_limit_hits"] else ""))
                if bench_bs8 and train["tokens_per_s"]:
                    notes.append(f"{train['tokens_per_s'] / bench_bs8:.2f}× the bench step at bs 8 ({bench_bs8:,.0f})")
                row["notes"] = "; ".join(notes)
            elif status == "ok":
                row["status"] = "failed (no log line)"
        rows.append(row)

    header = ["step", "what ran", "batch", "tokens/s", "MFU", "peak GiB", "wall s", "status", "notes"]
    table = ["| " + " | ".join(header) + " |", "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        table.append("| " + " | ".join([
            r["step"], r["what"], r["batch"], fmt(r["tokens_per_s"], ",.0f"),
            fmt(None if r["mfu"] is None else 100 * r["mfu"], ".3g", "%"), fmt(r["peak_gib"], ".2f"),
            fmt(r["seconds"], "d"), r["status"], r["notes"] or "–"]) + " |")
    total = sum(s["seconds"] for s in steps.values())
    env = (out / "env.txt").read_text() if (out / "env.txt").exists() else ""
    memory = "GPU max_memory_allocated" if args.mode == "gpu" else "process peak RSS"
    intro = (f"gpu_check ({args.mode}): {total} s of steps, budget {args.budget} s. tokens/s counts real tokens; "
             f"MFU as bench/distill_step.py; peak GiB: {memory}; train.py rows: the mean of their log windows "
             "after the first.")

    summary = ["# gpu_check", "", "```", env.strip(), "```", ""]
    for name in sorted(benches):
        summary += [f"## {name}", "", *benches[name].get("table", []), ""]
    summary += ["## steps", "", "| step | exit | seconds | limit or reason |", "| --- | --- | ---: | --- |"]
    summary += [f"| {n} | {s['exit'] if s['exit'] is not None else 'skipped'} | {s['seconds']} | {s['limit_or_reason']} |"
                for n, s in steps.items()]
    summary += ["", "## table", "", intro, "", *table, ""]
    (out / "summary.md").write_text("\n".join(summary))
    (out / "results.json").write_text(json.dumps({
        "mode": args.mode, "budget_s": args.budget, "steps": steps, "rows": rows, "train": trains,
        "distill_step": benches, "table": table}, indent=2))
    print(intro)
    print()
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
