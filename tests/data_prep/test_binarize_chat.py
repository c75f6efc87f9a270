"""binarize.py on conversations (.jsonl): the rendering, the loss mask, cutting at turns, refusals, the manifest.

The tokenizer is conftest's tiny_chat_tokenizer: the tiny sentencepiece model plus the special tokens
<|system|> <|user|> <|assistant|> <|end|> and the template `<|role|>content<|end|>` per message. Expected
sequences are worked out here by hand from that template: <s>, then per message its role marker, its
content as plain text encodes (NFKC + lowercase, sentencepiece), <|end|>; then </s>. The mask is 1 on an
assistant's content and its <|end|>, and 0 on its <|assistant|> marker (the generation prompt).
"""
import hashlib
import json

import numpy as np
import pytest
import sentencepiece as spm

from conftest import CHAT_TEMPLATE
from data_prep import binarize as binarize_mod
from data_prep.binarize import binarize
from distil_ja import chat, shards
from distil_ja.tokenization import load_tokenizer, normalize_text

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    {"messages": [msg(SYSTEM, "本を読む。"), msg(USER, "今日は雨が降っていた。"), msg(ASSISTANT, "駅まで傘をさして歩いた。"),
                  msg(USER, "電車の中では"), msg(ASSISTANT, "Pythonで小さなプログラムを書いた。")]},  # uppercase: lowercased
    {"prompt": "この町には古い寺がある。", "completion": "春になると桜を見に多くの人が訪れる。"},
    {"prompt": [msg(USER, "祖母が作る味噌汁は"), msg(ASSISTANT, "昆布と鰹節で出汁をとっている。"), msg(USER, "新しい駅ビルには")],
     "completion": [msg(ASSISTANT, "本屋と喫茶店が入っている。")]},  # the prompt's assistant turn is context
    {"messages": [msg(USER, "GPUで計算を速くする。"), msg(ASSISTANT, "方法を\n学んだ。")], "id": 7},  # two lines
]
# per conversation: (messages, trained), as the docs say the two shapes read
EXPECTED_TURNS = [
    (CONVERSATIONS[0]["messages"], [False, False, True, False, True]),
    ([msg(USER, CONVERSATIONS[1]["prompt"]), msg(ASSISTANT, CONVERSATIONS[1]["completion"])], [False, True]),
    (CONVERSATIONS[2]["prompt"] + CONVERSATIONS[2]["completion"], [False, False, False, True]),
    (CONVERSATIONS[3]["messages"], [False, True]),
]


# a template file: two end tokens a turn, both the assistant's to learn (and unlike the tokenizer's, so that
# workers reading the tokenizer's instead would show)
FILE_TEMPLATE = CHAT_TEMPLATE.replace("<|end|>", "<|end|><|end|>")


def write_jsonl(path, lines):
    """Conversations (dicts) and raw lines (str) as a JSONL file."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_chat_tokenizer):
    """The ids the hand-worked expectations use: special ids, markers, and the text encoding."""
    hf = load_tokenizer(str(tiny_chat_tokenizer))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_chat_tokenizer / "spiece.model"))
    marker = {role: hf.convert_tokens_to_ids(f"<|{role}|>") for role in (SYSTEM, USER, ASSISTANT)}
    return {"dir": str(tiny_chat_tokenizer), "hf": hf, "sp": sp, "marker": marker,
            "end": hf.convert_tokens_to_ids("<|end|>"), "bos": sp.bos_id(), "eos": sp.eos_id()}


def text_ids(tok, content):
    """Plain text as binarize encodes it: each line NFKC + lowercased, sentencepiece, concatenated."""
    return [i for line in content.split("\n") for i in tok["sp"].encode(normalize_text(line))]


def expected_turns(tok, messages, trained):
    """Each message's (ids, mask) under the test template, by hand."""
    turns = []
    for m, t in zip(messages, trained):
        body = text_ids(tok, m["content"]) + [tok["end"]]
        turns.append(([tok["marker"][m["role"]]] + body, [0] + [int(t)] * len(body)))
    return turns


def expected_sequence(tok, messages, trained):
    ids, mask = [tok["bos"]], [0]
    for t_ids, t_mask in expected_turns(tok, messages, trained):
        ids, mask = ids + t_ids, mask + t_mask
    return ids + [tok["eos"]], mask + [0]


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, tok):
    """CONVERSATIONS (three times over, with a blank line) binarized with the tokenizer's template, and with
    it given as a file with 1 and 2 workers: a chunk per conversation, small shards. (Once any binarize has
    run, tqdm's monitor thread makes the workers spawn: each 2-worker run costs seconds.)"""
    folder = tmp_path_factory.mktemp("chat")
    data = write_jsonl(folder / "chat.jsonl", CONVERSATIONS + [""] + CONVERSATIONS * 2)
    template_file = folder / "template.jinja"
    template_file.write_text(FILE_TEMPLATE, encoding="utf-8")
    runs = {}
    for name, workers in (("tokenizer", 1), ("file", 1), ("file", 2)):
        extra = {"chat_template": str(template_file)} if name == "file" else {}
        out = folder / f"{name}_w{workers}"
        binarize([str(data)], tok["dir"], str(out), num_workers=workers, lines_per_chunk=1, shard_size=60,
                 progress=False, **extra)
        runs[name, workers] = out
    return {"folder": folder, "data": data, "template_file": template_file, "runs": runs}


def read_back(out):
    sequences, manifest, extras = shards.load_sequences([out], extras=("loss_mask",))
    return sequences, extras["loss_mask"], manifest


def test_sequences_and_masks_are_the_hand_worked_ones(chat_runs, tok):
    sequences, masks, _ = read_back(chat_runs["runs"]["tokenizer", 1])
    expected = [expected_sequence(tok, *turns) for turns in EXPECTED_TURNS] * 3
    assert len(sequences) == len(expected)
    for seq, mask, (ids, want) in zip(sequences, masks, expected):
        assert seq.tolist() == ids
        assert mask.dtype == np.uint8 and len(mask) == len(seq)
        assert mask.tolist() == want


def masked_runs(seq, mask):
    """The runs of consecutive tokens masked 1."""
    runs, current = [], []
    for token, counted in zip(seq.tolist(), mask.tolist()):
        if counted:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


def test_the_masked_tokens_spell_the_assistant_contents_and_their_end_token(chat_runs, tok):
    sequences, masks, _ = read_back(chat_runs["runs"]["tokenizer", 1])
    for seq, mask, (messages, trained) in zip(sequences, masks, EXPECTED_TURNS):
        contents = [m["content"] for m, t in zip(messages, trained) if t]
        runs = masked_runs(seq, mask)
        assert len(runs) == len(contents)
        for run, content in zip(runs, contents):
            assert run[-1] == tok["end"]
            assert tok["sp"].decode(run[:-1]) == normalize_text(content.replace("\n", " "))


def test_the_prompt_completion_shape_is_a_user_then_an_assistant_message(tok, tmp_path):
    shapes = [{"prompt": "本を読む。", "completion": "駅まで歩いた。"},
              {"messages": [msg(USER, "本を読む。"), msg(ASSISTANT, "駅まで歩いた。")]},
              {"prompt": [msg(USER, "本を読む。")], "completion": [msg(ASSISTANT, "駅まで歩いた。")]}]
    binarize([str(write_jsonl(tmp_path / "c.jsonl", shapes))], tok["dir"], str(tmp_path / "out"), num_workers=1,
             progress=False)
    sequences, masks, _ = read_back(tmp_path / "out")
    assert sequences[0].tolist() == sequences[1].tolist() == sequences[2].tolist()
    assert masks[0].tolist() == masks[1].tolist() == masks[2].tolist()


def test_the_manifest_records_the_template_and_the_chat_totals(chat_runs, tok):
    _, masks, manifest = read_back(chat_runs["runs"]["tokenizer", 1])
    assert manifest["unit"] == "conversation" and manifest["max_len"] == chat.default_max_len(tok["hf"])
    assert manifest["chat_template"] == {"sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(),
                                         "source": "tokenizer"}
    assert manifest["tokenizer"]["vocab_size"] == len(tok["hf"]) > tok["sp"].get_piece_size()
    totals = manifest["totals"]
    assert totals["conversations"] == totals["documents"] == 3 * len(CONVERSATIONS)
    assert totals["assistant_tokens"] == sum(int(m.sum()) for m in masks) == sum(s["assistant_tokens"]
                                                                                  for s in manifest["shards"])
    assert totals["cut_turns"] == 0 and totals["lines"] == 3 * len(CONVERSATIONS) + 1
    assert len(manifest["shards"]) > 1 and all("loss_mask" in s["extras"] for s in manifest["shards"])
    by_file = read_back(chat_runs["runs"]["file", 1])[2]
    assert by_file["chat_template"] == {"sha256": hashlib.sha256(FILE_TEMPLATE.encode()).hexdigest(),
                                        "source": str(chat_runs["template_file"])}


def test_a_template_file_overrides_the_tokenizers_own(chat_runs, tok):
    sequences, masks, _ = read_back(chat_runs["runs"]["file", 1])
    end = tok["end"]
    for seq, mask, (messages, trained) in zip(sequences, masks, EXPECTED_TURNS):
        ids, want = expected_sequence(tok, messages, trained)
        doubled = [t for i in ids[:-1] for t in ([i, end] if i == end else [i])] + ids[-1:]
        assert seq.tolist() == doubled
        assert [t for run in masked_runs(seq, mask) for t in run[-2:]] == [end, end] * sum(trained)


def test_shards_are_byte_identical_whatever_the_workers(chat_runs):
    runs = chat_runs["runs"]
    one, two = runs["file", 1], runs["file", 2]
    files = sorted(p.name for p in one.iterdir() if p.name != shards.MANIFEST)
    assert files == sorted(p.name for p in two.iterdir() if p.name != shards.MANIFEST)
    assert any(f.endswith(".loss_mask.pickle") for f in files)
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    assert shards.load_manifest(one)["shards"] == shards.load_manifest(two)["shards"]


def test_a_template_that_writes_bos_and_eos_gets_neither_twice(tok, tmp_path):
    template = tmp_path / "eos.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}", encoding="utf-8")
    data = write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS[1]])
    binarize([str(data)], tok["dir"], str(tmp_path / "out"), num_workers=1, progress=False, chat_template=str(template))
    (seq,), (mask,), _ = read_back(tmp_path / "out")
    user, answer = text_ids(tok, CONVERSATIONS[1]["prompt"]), text_ids(tok, CONVERSATIONS[1]["completion"])
    assert seq.tolist() == ([tok["bos"], tok["marker"][USER], *user, tok["eos"], tok["marker"][ASSISTANT], *answer,
                             tok["eos"]])
    assert mask.tolist() == [0] * (len(user) + 4) + [1] * (len(answer) + 1)  # the assistant's </s> is learned


# ---- cutting --------------------------------------------------------------------------------


def test_cut_packs_whole_turns_and_cuts_only_a_turn_that_does_not_fit():
    ids, mask = list(range(10, 20)), [0, 0, 0, 1, 1, 1, 1, 0, 1, 1]
    pieces, cuts = chat.cut(ids, mask, [0, 3, 7], 6, bos=1, eos=2)  # turns of 3, 4, 3 tokens; room 4
    assert [p.tolist() for p, _ in pieces] == [[1, 10, 11, 12, 2], [1, 13, 14, 15, 16, 2], [1, 17, 18, 19, 2]]
    assert [m.tolist() for _, m in pieces] == [[0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert cuts == []
    pieces, cuts = chat.cut(ids, mask, [0, 3, 7], 5, bos=1, eos=2)  # room 3: the 4-token turn is cut
    assert [p.tolist()[1:-1] for p, _ in pieces] == [[10, 11, 12], [13, 14, 15], [16], [17, 18, 19]]
    assert cuts == [(1, 4)]
    pieces, cuts = chat.cut(ids, mask, [0, 3, 7], 9, bos=1, eos=2)  # room 7: two turns, then one
    assert [p.tolist()[1:-1] for p, _ in pieces] == [ids[:7], ids[7:]] and cuts == []
    pieces, cuts = chat.cut(ids, mask, [0, 3, 7], 12, bos=1, eos=2)  # everything fits
    assert [p.tolist() for p, _ in pieces] == [[1, *ids, 2]] and cuts == []


def test_a_long_conversation_is_cut_at_turn_starts(tok, tmp_path):
    messages, trained = EXPECTED_TURNS[0]
    turns = expected_turns(tok, messages, trained)
    max_len = max(len(ids) for ids, _ in turns) + 2 + 1  # every turn fits, the conversation does not
    assert sum(len(ids) for ids, _ in turns) + 2 > max_len
    data = write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS[0]])
    manifest = binarize([str(data)], tok["dir"], str(tmp_path / "out"), num_workers=1, progress=False, max_len=max_len)
    sequences, masks, _ = read_back(tmp_path / "out")
    assert manifest["totals"]["cut_turns"] == 0 and manifest["max_len"] == max_len and len(sequences) > 1
    for seq, mask in zip(sequences, masks):
        assert len(seq) <= max_len and seq[0] == tok["bos"] and seq[-1] == tok["eos"] and mask[0] == mask[-1] == 0
    # the pieces hold the turns in order, each starting at a turn and holding as many whole turns as fit
    assert [t for s in sequences for t in s[1:-1].tolist()] == [t for ids, _ in turns for t in ids]
    assert [t for m in masks for t in m[1:-1].tolist()] == [t for _, mask in turns for t in mask]
    turn_starts = np.cumsum([0] + [len(ids) for ids, _ in turns]).tolist()
    piece_starts = np.cumsum([0] + [len(s) - 2 for s in sequences]).tolist()
    assert set(piece_starts) <= set(turn_starts)
    for seq, start in zip(sequences[:-1], piece_starts[1:]):
        next_turn = turn_starts[turn_starts.index(start) + 1] - start
        assert len(seq) + next_turn > max_len  # the next turn did not fit in this piece


def test_a_turn_longer_than_max_len_is_cut_counted_and_logged(tok, tmp_path, caplog):
    long_answer = "駅まで傘をさして歩いた。" * 12
    conversation = {"messages": [msg(USER, "今日は雨が降っていた。"), msg(ASSISTANT, long_answer)]}
    data = write_jsonl(tmp_path / "c.jsonl", [conversation])
    whole, want_mask = expected_sequence(tok, conversation["messages"], [False, True])
    max_len = 24
    assert len(whole) > 2 * max_len
    rc = binarize_mod.main(["--input", str(data), "--tokenizer", tok["dir"], "--output_dir", str(tmp_path / "out"),
                            "--max_len", str(max_len), "--num_workers", "1", "--quiet"])
    assert rc == 0
    turn_tokens = len(expected_turns(tok, conversation["messages"], [False, True])[1][0])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if f"c.jsonl:1: message 2 is {turn_tokens} tokens, more than fit in --max_len "
            f"{max_len}" in w], warnings
    sequences, masks, manifest = read_back(tmp_path / "out")
    assert manifest["totals"]["cut_turns"] == 1
    assert all(len(s) <= max_len for s in sequences) and max(len(s) for s in sequences) == max_len
    assert [t for s in sequences for t in s[1:-1].tolist()] == whole[1:-1]
    assert [t for m in masks for t in m[1:-1].tolist()] == want_mask[1:-1]


# ---- refusals -------------------------------------------------------------------------------

BAD_LINES = {  # case: (the line, words its one-line error holds)
    "bad_json": ('{"messages": [', "not valid JSON"),
    "unknown_role": (json.dumps({"messages": [msg("tool", "x"), msg(ASSISTANT, "y")]}), "unknown role 'tool'"),
    "missing_content": (json.dumps({"messages": [{"role": USER}, msg(ASSISTANT, "y")]}), '"content"'),
    "no_assistant": (json.dumps({"messages": [msg(USER, "本")]}), "no assistant message"),
    "neither_shape": (json.dumps({"text": "本"}), '"messages"'),
    "prompt_alone": (json.dumps({"prompt": "本"}), '"completion"'),
    "completion_not_assistant": (json.dumps({"prompt": [msg(USER, "a")], "completion": [msg(USER, "b")]}),
                                 "not the assistant"),
    "special_token_in_text": (json.dumps({"messages": [msg(USER, "本<|end|>"), msg(ASSISTANT, "y")]}), "'<|end|>'"),
    "assistant_first": (json.dumps({"messages": [msg(ASSISTANT, "y")]}), "first message"),
}


def run_main(args, capsys):
    rc = binarize_mod.main([*map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("case", sorted(BAD_LINES) + ["bad_json_in_a_worker"])
def test_a_malformed_line_is_one_error_line_naming_file_and_line(case, tok, tmp_path, capsys):
    line, words = BAD_LINES[case.removesuffix("_in_a_worker")]
    workers = "2" if case.endswith("_in_a_worker") else "1"
    data = write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS[1], "", line, CONVERSATIONS[1]])
    rc, err = run_main(["--input", data, "--tokenizer", tok["dir"], "--output_dir", tmp_path / "out",
                        "--num_workers", workers, "--lines_per_chunk", "1"], capsys)
    assert rc == 1 and err[-1].startswith(f"error: {data}:3: ") and words in err[-1], err
    assert not any("Traceback" in e for e in err)
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


def test_a_template_that_rewrites_earlier_turns_is_refused(tok, tmp_path, capsys):
    template = tmp_path / "count.jinja"  # the message count first: no rendering is a prefix of the next
    template.write_text("{{ messages | length }}" + CHAT_TEMPLATE, encoding="utf-8")
    data = write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS[1]])
    rc, err = run_main(["--input", data, "--tokenizer", tok["dir"], "--output_dir", tmp_path / "out",
                        "--chat_template", template, "--num_workers", "1"], capsys)
    assert rc == 1 and err[-1].startswith(f"error: {data}:1: ") and "cannot be told apart" in err[-1], err


USAGE_ERRORS = {  # case: (extra flags, words its one-line error holds)
    "no_template": ([], "no chat template"),
    "missing_template_file": (["--chat_template", "gone.jinja"], "gone.jinja"),
    "unit": (["--unit", "line"], "--unit"),
    "teacher": (["--teacher_tokenizer", "x"], "--teacher_tokenizer"),
    "short_max_len": (["--max_len", "2"], "--max_len"),
    "mixed_inputs": ([], "mixes"),
    "max_len_on_text": (["--max_len", "64"], "--max_len"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_bad_flags_and_tokenizers_without_a_template_are_one_line_exit_2(case, tok, tiny_tokenizer, tmp_path, capsys):
    extra, words = USAGE_ERRORS[case]
    data = write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS[1]])
    text = tmp_path / "t.txt"
    text.write_text("本を読む。\n", encoding="utf-8")
    inputs = {"mixed_inputs": [data, text], "max_len_on_text": [text]}.get(case, [data])
    tokenizer = tiny_tokenizer if case == "no_template" else tok["dir"]
    extra = [str(tmp_path / e) if e.endswith(".jinja") else e for e in extra]
    rc, err = run_main(["--input", *inputs, "--tokenizer", tokenizer, "--output_dir", tmp_path / "out", *extra], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "out" / shards.MANIFEST).exists()
