import json

import pytest

from capline.vocab import SPECIAL_TOKENS, VocabError, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, LEFT of the square.") == ["a", "red", "circle", "left", "of", "the", "square"]


def test_build_keeps_frequent_words_most_frequent_first():
    vocab = Vocabulary.build(["a red circle", "a blue circle", "a red square"], min_count=2)
    assert vocab.words[:4] == list(SPECIAL_TOKENS)
    assert vocab.words[4:] == ["a", "circle", "red"]


def test_encode_decode_round_trip_with_unknown_words():
    vocab = Vocabulary.build(["a red circle"], min_count=1)
    ids = vocab.encode("A red zebra")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and ids[3] == vocab.unk_id
    assert vocab.decode(ids) == "a red <unk>"
    assert vocab.decode([vocab.index["red"], vocab.end_id, vocab.index["a"]]) == "red"
    assert len(vocab.encode("a red circle", max_len=2)) == 4


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(["a red circle"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab


@pytest.mark.parametrize(
    "content,words",
    [("{not json", "not valid JSON"), (json.dumps({"words": ["a"]}), "special tokens"), ("[1, 2]", "malformed")],
)
def test_malformed_vocab_files_name_the_problem(tmp_path, content, words):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(VocabError, match=words):
        Vocabulary.load(path)


def test_missing_vocab_file_is_named(tmp_path):
    with pytest.raises(VocabError, match="does not exist"):
        Vocabulary.load(tmp_path / "nope.json")
