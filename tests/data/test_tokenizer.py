"""Tokenizers: a trained byte-level BPE and a Hugging Face tokenizer from a local directory."""

import pytest

from slmctl.data.tokenizer import TextTokenizer, TokenizerError, load_hf_tokenizer, train_bpe

TEXTS = ["Mara Quell lives in Tobrin.", "Where does Mara Quell live?", "Tobrin is a city of bakers."] * 50


def test_bpe_round_trip_specials_and_copyable_words(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=400, n_sentinels=4)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    assert tok.sentinel_ids == [4, 5, 6, 7]
    text = "Where does Mara Quell live? Tobrin."
    assert tok.decode(tok.encode(text)) == text
    # a word at the start of a text is the same token as inside one (answers copy context tokens)
    assert tok.encode("Tobrin") == tok.encode("in Tobrin")[-len(tok.encode("Tobrin")):]
    tok.save(tmp_path / "t")
    again = TextTokenizer.load(tmp_path / "t")
    assert again.encode(text) == tok.encode(text) and again.sentinel_ids == tok.sentinel_ids


def test_a_tokenizer_saved_before_the_decoder_stripped_the_prefix_space_decodes_the_same(tmp_path):
    """Older tokenizer.json files have a plain ByteLevel decoder (slmctl stripped the prefix space
    itself); the strip now lives in the tokenizer, so transformers' loaders decode alike."""
    from tokenizers import decoders

    tok = train_bpe(TEXTS, vocab_size=400, n_sentinels=4)
    assert tok.backend.decode(tok.encode("Tobrin bakers")) == "Tobrin bakers"  # the tokenizer itself strips
    tok.backend.decoder = decoders.ByteLevel()  # as saved by earlier versions
    tok.save(tmp_path / "old")
    assert TextTokenizer.load(tmp_path / "old").decode(tok.encode("Tobrin bakers")) == "Tobrin bakers"


def test_bpe_vocab_too_small_is_a_clear_error():
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(TEXTS, vocab_size=100)


def test_hugging_face_tokenizer_from_a_local_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(TEXTS, vocab_size=400, n_sentinels=0)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe.backend, eos_token="</s>", bos_token="<s>", unk_token="<pad>")
    hf.save_pretrained(tmp_path / "hf")  # no pad token, no image token, no sentinels
    tok = load_hf_tokenizer(str(tmp_path / "hf"), n_sentinels=2)
    assert tok.pad_id == 0 and tok.eos_id == 2 and tok.image_id is not None and len(tok.sentinel_ids) == 2
    assert tok.decode(tok.encode("Mara Quell")).strip() == "Mara Quell"
    tok.save(tmp_path / "saved")
    assert TextTokenizer.load(tmp_path / "saved").image_id == tok.image_id
    with pytest.raises(TokenizerError, match="cannot load a tokenizer"):
        load_hf_tokenizer(str(tmp_path / "missing"))
