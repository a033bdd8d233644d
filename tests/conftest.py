"""Shared fixtures: a tiny random Llama with its own tiny tokenizer, saved as an ordinary
Hugging Face folder, so every test runs the kit's real loading path (4-bit + LoRA) in seconds."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALICE = ROOT / "data" / "fiction" / "carroll_alice_in_wonderland.txt"


def build_tiny_model(folder, text, vocab_size=384, seed=0):
    """Save a 2-layer Llama (hidden 64) and a byte-level BPE tokenizer trained on `text` to `folder`.
    initializer_range=0.3: at the usual 0.02 a frozen random model barely moves under LoRA."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_text():
    """About 40 kB of Alice in Wonderland: enough blocks for every split the tests ask for."""
    return ALICE.read_text(encoding="utf-8")[:40_000]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_text):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_text)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_text):
    """The tiny text as a .txt file for --data."""
    path = tmp_path_factory.mktemp("data") / "alice.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return str(path)
