"""Hugging Face tokenizer.json files built offline with the tokenizers library (nothing from a hub)."""

from mile.data import tokenizer as mtok


def train_hf_tokenizer(style, path, lines, vocab_size):
    """A small tokenizer.json trained on ``lines``, saved at ``path``, loaded as mile loads it.

    "metaspace": LLaMA-like BPE over "▁"-words with </s>, <s>, <pad>, <unk> and a BERT-style
    post-processor (which the export must drop). "bytelevel": GPT-2-like byte-level BPE whose
    only special token is <|endoftext|> (found by name: no tokenizer_config.json, no pad).
    "no-eos": a byte-level BPE with no special token at all.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if style == "metaspace":
        specials = ["</s>", "<s>", "<pad>", "<unk>"]
        hf = Tokenizer(models.BPE(unk_token="<unk>"))
        hf.normalizer = normalizers.NFKC()
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
        hf.train_from_iterator(lines, trainer)
        hf.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 0)]
        )
    else:
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[] if style == "no-eos" else ["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(lines, trainer)
        hf.post_processor = processors.ByteLevel(trim_offsets=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(path))
    return mtok.load_tokenizer(path)
