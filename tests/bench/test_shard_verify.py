"""bench/shard_verify.py at a tiny size: it runs, prints its table, and its JSON holds what the table says."""

import json

from helpers import load_script


def test_tiny_run_prints_the_table_and_the_projection(tmp_path, capsys):
    bench = load_script("bench/shard_verify.py")
    out = tmp_path / "v.json"
    assert bench.main(["--shard_tokens", "20000", "--dump_mb", "2", "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert "--verify full" in printed and "Projected for 1.5e+10 tokens" in printed
    assert figures["shard_tokens"] == 20000 and figures["read_full_s"] > 0 and figures["dump_hash_mb_s"] > 0
    # the projection is the measured rate applied to the corpus: 15e9 tokens x 2 bytes
    assert abs(figures["shards_read_full_min"] - 15e9 * 2 / 2**20 / figures["read_full_mb_s"] / 60) < 1e-6
