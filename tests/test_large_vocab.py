"""A vocabulary of more than 65,536 ids (Qwen2 151,643, llm-jp-3 99,487) end to end: binarize.py writes
int32 shards, train.py's token cache keeps every id, and evaluation tokenizes text to the same ids.

The tokenizer is a tiny rinna-layout model grown to LARGE_VOCAB pieces (fillers that no text matches),
with pieces the text really uses moved to ids above 65,535: a uint16 anywhere on the way would wrap
them to small ids without an error.
"""

import json
import math
import pickle

import numpy as np
import pytest

from helpers import gpt2_config

LARGE_VOCAB = 70_400
HIGH_IDS = (65_536, 68_000, LARGE_VOCAB - 1)  # where the text's three most used pieces are moved
RINNA_SPECIALS = ["<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]

TEXT = """\
朝の駅はいつも人が多く、電車を待つ列が長くのびている。
窓の外を見ると、川の向こうに白い雲が浮かんでいた。

週末は図書館で本を読み、帰りに喫茶店でコーヒーを飲んだ。
店の人はていねいに豆をひいて、ゆっくりと湯を注いでいた。

GPUを使うと、大きなモデルの学習が何倍も速くなる。
PythonとGPUで小さな言語モデルを作り、文章を生成してみた。

春になると川ぞいの桜が咲き、多くの人が写真をとりに来る。
夜には明かりがともり、水面に花びらが浮かんで見えた。
"""


def grow_vocabulary(model_bytes: bytes, lines: list[str]) -> bytes:
    """The sentencepiece model with filler pieces up to LARGE_VOCAB and the three pieces most used
    by lines swapped with the fillers at HIGH_IDS (scores travel with pieces: same segmentation)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from distil_ja.tokenization import normalize_text

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    counts = np.bincount([i for line in lines for i in sp.encode(normalize_text(line))], minlength=len(proto.pieces))
    counts[: len(RINNA_SPECIALS)] = 0  # rinna's special ids 0-6 stay where they are
    most_used = np.argsort(-counts, kind="stable")[: len(HIGH_IDS)].tolist()
    low = min(piece.score for piece in proto.pieces)
    for i in range(len(proto.pieces), LARGE_VOCAB):  # private-use characters: no text matches them
        proto.pieces.add(piece=f"\ue000{i}", score=low, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
    for used, high in zip(most_used, HIGH_IDS):
        moved = sentencepiece_model_pb2.ModelProto.SentencePiece()
        moved.CopyFrom(proto.pieces[used])
        proto.pieces[used].CopyFrom(proto.pieces[high])
        proto.pieces[high].CopyFrom(moved)
    proto.trainer_spec.vocab_size = LARGE_VOCAB
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Paths: the text, a large-vocabulary tokenizer folder and the text binarized with it."""
    import sentencepiece as spm

    from data_prep.binarize import binarize
    from data_prep.make_tokenizer import train_tokenizer, write_tokenizer_files

    folder = tmp_path_factory.mktemp("large_vocab")
    text = folder / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    train_tokenizer([str(text)], 200, str(folder / "small"))
    model = grow_vocabulary((folder / "small" / "spiece.model").read_bytes(), TEXT.splitlines())
    write_tokenizer_files(model, str(folder / "tok"))  # as make_tokenizer.py writes its output

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tok" / "spiece.model"))
    assert sp.get_piece_size() == LARGE_VOCAB
    assert [sp.id_to_piece(i) for i in range(len(RINNA_SPECIALS))] == RINNA_SPECIALS
    assert [sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()] == [0, 1, 2, 3]

    manifest = binarize([str(text)], str(folder / "tok"), str(folder / "bin"), num_workers=1, progress=False)
    return {"text": text, "tokenizer": folder / "tok", "data": folder / "bin", "manifest": manifest}


def plain_shard_sequences(data_dir) -> list[np.ndarray]:
    """Every shard's sequences, read with plain pickle (no project code)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    sequences = []
    for entry in manifest["shards"]:
        with open(data_dir / entry["file"], "rb") as f:
            sequences += pickle.load(f)
    return sequences


def test_binarize_writes_int32_shards_with_ids_above_uint16(large):
    from distil_ja.tokenization import DocumentEncoder, iter_documents

    manifest = json.loads((large["data"] / "manifest.json").read_text())
    assert manifest["dtype"] == "int32"
    assert manifest["tokenizer"]["vocab_size"] == LARGE_VOCAB
    assert manifest["totals"]["unk_tokens"] == 0
    sequences = plain_shard_sequences(large["data"])
    assert {s.dtype for s in sequences} == {np.dtype(np.int32)}
    assert set(HIGH_IDS) <= set(np.concatenate(sequences).tolist())
    encoder = DocumentEncoder(str(large["tokenizer"]))  # sentencepiece itself, as Python ints
    expected = [encoder.encode_document(doc)[0] for doc in iter_documents(str(large["text"]))]
    assert [s.tolist() for s in sequences] == expected


def test_training_and_evaluation_see_the_binarized_ids(large, tmp_path):
    import train
    from lm_seqs_dataset import MIN_SEQ_LEN, LmSeqsDataset
    from perplexity import read_eval_data
    from token_cache import MappedSequences

    sequences = plain_shard_sequences(large["data"])
    n_positions = 128
    assert all(MIN_SEQ_LEN <= len(s) <= n_positions for s in sequences)  # none is split or dropped
    config = tmp_path / "student.json"
    config.write_text(json.dumps(gpt2_config(n_layer=1, n_embd=16, vocab_size=LARGE_VOCAB,
                                             n_positions=n_positions).to_dict()))
    dump = tmp_path / "run"
    train.run([
        "--dump_path", str(dump), "--data_file", str(large["data"]), "--student_config", str(config),
        "--tokenizer_name", str(large["tokenizer"]), "--eval_data", str(large["text"]), "--n_gpu", "0",
        "--alpha_ce", "0", "--alpha_cos", "0", "--alpha_clm", "1", "--batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "2", "--warmup_prop", "0", "--checkpoint_interval", "0",
    ])

    cache = MappedSequences(dump / "token_cache")
    assert cache.tokens.dtype == np.int32
    assert len(cache) == len(sequences)
    assert cache.lengths().tolist() == [len(s) for s in sequences]
    cached = [cache[i] for i in range(len(cache))]
    for seq, shard in zip(cached, sequences):
        np.testing.assert_array_equal(seq, shard)
    token_ids, _ = LmSeqsDataset.from_cache(dump / "token_cache").batch_sequences(cached)
    assert set(HIGH_IDS) <= set(token_ids.flatten().tolist())  # what the training batches hold

    evaluated = read_eval_data(str(large["text"]), str(large["tokenizer"])).sequences
    assert [s.tolist() for s in evaluated] == [s.tolist() for s in sequences]
    assert math.isfinite(json.loads((dump / "eval_results.json").read_text())["perplexity"])
