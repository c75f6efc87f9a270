"""Small task files in JGLUE's released format (one JSON object per line, JGLUE's field names), shared by
test_tasks.py and tasks_worker.py. The words are from the tiny test tokenizer's text (conftest.py), so
every choice has pieces of its own."""

import json
from pathlib import Path

# JCommonsenseQA (datasets/jcommonsenseqa-v1.x/*.json): q_id, question, choice0..choice4, label (an index)
JCQA = [
    {"q_id": 8939, "question": "電車の中で何を読む？", "choice0": "本", "choice1": "雨", "choice2": "桜",
     "choice3": "駅ビル", "choice4": "味噌汁", "label": 0},
    {"q_id": 8940, "question": "春になると何を見に行く？", "choice0": "傘", "choice1": "桜", "choice2": "電車",
     "choice3": "本屋", "choice4": "昆布", "label": 1},
    {"q_id": 8941, "question": "雨の日にさすものは？", "choice0": "喫茶店", "choice1": "窓", "choice2": "傘",
     "choice3": "寺", "choice4": "GPU", "label": 2},
    {"q_id": 8942, "question": "出汁をとるものは？", "choice0": "窓", "choice1": "駅", "choice2": "本",
     "choice3": "昆布と鰹節", "choice4": "傘", "label": 3},
    {"q_id": 8943, "question": "週末に混むのは？", "choice0": "寺", "choice1": "Python", "choice2": "雨",
     "choice3": "景色", "choice4": "駅ビル", "label": 4},
    {"q_id": 8944, "question": "古い寺がある所は？", "choice0": "この町", "choice1": "電車", "choice2": "味噌汁",
     "choice3": "GPU", "choice4": "窓の外", "label": 0},
]

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
