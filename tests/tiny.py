"""Tiny random models saved as ordinary Hugging Face folders, so the tests (and the benchmark's
paper-model shapes, and the notebook's quick check) run the kit's whole loading path (4-bit +
LoRA) with nothing downloaded."""

import torch

import runfiles

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def random_model(
    folder,
    text,
    vocab_size=384,
    shape=None,
    bos=False,
    seed=0,
    initializer_range=0.3,
    dtype=torch.float32,
    device="cpu",
):
    """Save a randomly initialised Llama and a byte-level BPE tokenizer trained on `text` into
    `folder`, an ordinary Hugging Face folder that --model takes: the kit's whole code path with
    nothing downloaded (the tests, the notebook's quick check, the benchmark's paper-model
    shapes). shape: LlamaConfig sizes (default TINY_SHAPE: 2 layers, hidden 64). bos: the
    tokenizer starts every text with <s>, as Llama's does. initializer_range 0.3: at the usual
    0.02 a frozen random model barely moves under LoRA. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    runfiles.quiet_libraries()
    specials = ["<eos>"] + (["<s>"] if bos else [])
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([text], trainer)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>", bos_token="<s>" if bos else None
    )
    shape = dict(shape or TINY_SHAPE)
    config = LlamaConfig(
        vocab_size=shape.pop("vocab_size", len(tokenizer)),  # a shape may ask for more ids
        **shape,
        initializer_range=initializer_range,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs, in its dtype: an 8B shape never in fp32
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def random_imagegpt(folder, side=4, clusters=8, shape=None, seed=0, positions=None):
    """Save a randomly initialised ImageGPT and ImageGPT's image processor with `clusters` random
    colour clusters for side x side images into `folder`: a local folder laid out as the hub's
    openai/imagegpt-* are (no tokenizer: images.py prepares it as it prepares a hub model).
    positions: the model's context, side * side by default, as the hub models have (all but the
    last pixel after <sos>). Returns the folder."""
    import numpy as np
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    runfiles.quiet_libraries()
    config = ImageGPTConfig(
        vocab_size=clusters + 1,
        n_positions=positions or side * side,
        **(shape or dict(n_embd=32, n_layer=2, n_head=2)),
        initializer_range=0.3,  # as random_model's: a frozen random model then moves under LoRA
    )
    torch.manual_seed(seed)
    ImageGPTForCausalImageModeling(config).save_pretrained(folder)
    colours = np.random.default_rng(seed).uniform(-1, 1, size=(clusters, 3))
    size = dict(height=side, width=side)
    ImageGPTImageProcessor(clusters=colours, size=size).save_pretrained(folder)
    return str(folder)
