"""Small task files in JGLUE's released format (one JSON object per line, JGLUE's field names), shared by
test_tasks.py and test_lm_eval_check.py. The words are from the tiny test tokenizer's text (conftest.py), so
every choice has pieces of its own."""

import json
from pathlib import Path

# JCommonsenseQA (datasets/jcommonsenseqa-v1.x/*.json): q_id, question, choice0..choice4, label (an index)
_JCQA_ROWS = [  # question, the five choices, the answer's index
    ("電車の中で何を読む？", "本 雨 桜 駅ビル 味噌汁", 0),
    ("春になると何を見に行く？", "傘 桜 電車 本屋 昆布", 1),
    ("雨の日にさすものは？", "喫茶店 窓 傘 寺 GPU", 2),
    ("出汁をとるものは？", "窓 駅 本 昆布と鰹節 傘", 3),
    ("週末に混むのは？", "寺 Python 雨 景色 駅ビル", 4),
    ("古い寺がある所は？", "この町 電車 味噌汁 GPU 窓の外", 0),
]
JCQA = [{"q_id": 8939 + i, "question": question, **{f"choice{k}": c for k, c in enumerate(choices.split())},
         "label": label} for i, (question, choices, label) in enumerate(_JCQA_ROWS)]

# JNLI (datasets/jnli-v1.x/*.json): sentence_pair_id (a string), yjcaptions_id, sentence1, sentence2,
# label as a word
JNLI = [
    {"sentence_pair_id": "0", "yjcaptions_id": "100207-104495-104497", "sentence1": "駅まで傘をさして歩いた。",
     "sentence2": "雨が降っていた。", "label": "neutral"},
    {"sentence_pair_id": "1", "yjcaptions_id": "101503-105624-105626", "sentence1": "電車の中で本を読んだ。",
     "sentence2": "本を読んだ。", "label": "entailment"},
    {"sentence_pair_id": "2", "yjcaptions_id": "101503-105626-105624", "sentence1": "寺に桜を見に行った。",
     "sentence2": "寺には行かなかった。", "label": "contradiction"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
