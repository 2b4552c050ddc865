"""Random-weight models in Hugging Face layout, for tests and benchmarks.

Speed and memory do not depend on weight values, so a seeded random model with the real shapes
stands in for BAAI/bge-m3 or bge-small when the hub cannot be reached. The folders are laid out
exactly like the published ones (config, safetensors, tokenizer.json, ``sparse_linear.pt`` and
``colbert_linear.pt`` for M3, sentence-transformers pooling config), so export treats them alike.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelShape", "TINY_M3", "TINY_BERT", "FULL_M3", "FULL_BGE_SMALL", "TINY_RERANKER_M3", "TINY_RERANKER_BASE",
           "FULL_RERANKER_M3", "FULL_RERANKER_BASE", "build_random_model"]


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a random model: ``kind`` is ``m3`` (XLM-R + heads), ``dense`` (BERT) or ``reranker``
    (XLMRobertaForSequenceClassification, one label)."""

    kind: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int  # rows of the embedding table (the tokenizer may use fewer)
    max_length: int
    tokenizer_vocab: int = 2000
    # std of the random weights (transformers' default 0.02). Rerankers use more: at 0.02 a random classifier
    # gives every pair nearly the same score (std 5e-5 over the calibration pairs), which tests nothing; at 0.3
    # the tiny reranker's scores spread like a trained one's (std 0.7, max |score| 1.6)
    initializer_range: float = 0.02


TINY_M3 = ModelShape("m3", layers=2, hidden=32, heads=4, intermediate=64, vocab=1200, max_length=8192,
                     tokenizer_vocab=1000)
TINY_BERT = ModelShape("dense", layers=2, hidden=32, heads=4, intermediate=64, vocab=1200, max_length=512,
                       tokenizer_vocab=1000)
FULL_M3 = ModelShape("m3", layers=24, hidden=1024, heads=16, intermediate=4096, vocab=250002, max_length=8192,
                     tokenizer_vocab=8000)
# bge-reranker-v2-m3 layout (8,194 positions, read up to 8,192 tokens) and bge-reranker-base/large (514 positions)
TINY_RERANKER_M3 = ModelShape("reranker", layers=2, hidden=32, heads=4, intermediate=64, vocab=1200, max_length=8192,
                              tokenizer_vocab=1000, initializer_range=0.3)
TINY_RERANKER_BASE = ModelShape("reranker", layers=2, hidden=32, heads=4, intermediate=64, vocab=1200,
                                max_length=512, tokenizer_vocab=1000, initializer_range=0.3)
# full shapes keep transformers' 0.02: at 0.3 a 12-layer random model amplifies float rounding so much that its
# fused fp32 graph differs from PyTorch by 1.85 (export refuses it); speed does not depend on the values
FULL_RERANKER_M3 = ModelShape("reranker", layers=24, hidden=1024, heads=16, intermediate=4096, vocab=250002,
                              max_length=8192, tokenizer_vocab=8000)
FULL_RERANKER_BASE = ModelShape("reranker", layers=12, hidden=768, heads=12, intermediate=3072, vocab=250002,
                                max_length=512, tokenizer_vocab=8000)
FULL_BGE_SMALL = ModelShape("dense", layers=12, hidden=384, heads=12, intermediate=1536, vocab=30522,
                            max_length=512, tokenizer_vocab=8000)

_WORDS = {
    "en": "the model encodes every passage into dense sparse and multi vector representations for retrieval "
          "search query document token weight score language small fast edge device memory batch length "
          "science protein cell gene study results patients effect treatment data analysis network".split(),
    "de": "das modell kodiert jede passage schnell und genau für die suche nach dokumenten".split(),
    "fr": "le modèle encode chaque passage pour la recherche de documents très rapidement".split(),
    "ru": "модель кодирует каждый фрагмент текста для поиска документов быстро".split(),
    "zh": list("模型将每个段落编码为稠密稀疏和多向量表示以便检索"),
    "ja": list("モデルはすべての文章を検索のためにベクトルに変換します"),
    "ar": "النموذج يرمز كل فقرة من أجل البحث عن المستندات بسرعة".split(),
    "he": "המודל מקודד כל פסקה לחיפוש מסמכים במהירות".split(),
    "hi": "मॉडल हर अनुच्छेद को खोज के लिए तेजी से एन्कोड करता है".split(),
    "emoji": ["🙂", "🚀", "👍🏽", "🇩🇪", "❤️", "🧬"],
}


def _training_corpus(seed: int, n: int = 3000) -> list[str]:
    """Seeded multilingual sentences for training the tokenizer."""
    rng = random.Random(seed)
    langs = sorted(_WORDS)
    out = []
    for _ in range(n):
        words = _WORDS[rng.choice(langs)]
        joiner = "" if words is _WORDS["zh"] or words is _WORDS["ja"] else " "
        out.append(joiner.join(rng.choice(words) for _ in range(rng.randint(3, 20))))
    return out


def _xlmr_tokenizer(vocab_size: int, seed: int, corpus: list[str] | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", max_piece_length=8, show_progress=False)
    tok.train_from_iterator(corpus or _training_corpus(seed), trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    specials = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
    return tok, specials


def _bert_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(_training_corpus(seed), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                "mask_token": "[MASK]"}
    return tok, specials


def build_random_model(out_dir: str | Path, shape: ModelShape = TINY_M3, seed: int = 0,
                       pooling: str = "cls", tokenizer_corpus: list[str] | None = None) -> Path:
    """Write a seeded random model of ``shape`` in Hugging Face layout to ``out_dir``; return the folder.

    ``pooling`` goes into the sentence-transformers ``1_Pooling/config.json`` (``cls`` or ``mean``).
    ``tokenizer_corpus`` (XLM-R shapes): texts to train the tokenizer on instead of the built-in multilingual
    sentences, e.g. the benchmark's corpus, so its token counts are near a real tokenizer's.
    Needs the ``[export]`` extra (torch, transformers, safetensors).
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if shape.kind in ("m3", "reranker"):
        cfg = transformers.XLMRobertaConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
            max_position_embeddings=shape.max_length + 2, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
            initializer_range=shape.initializer_range)
        if shape.kind == "reranker":
            cfg.num_labels = 1
            cfg.architectures = ["XLMRobertaForSequenceClassification"]
            model = transformers.XLMRobertaForSequenceClassification(cfg)
        else:
            model = transformers.XLMRobertaModel(cfg, add_pooling_layer=False)
        tok, specials = _xlmr_tokenizer(shape.tokenizer_vocab, seed, tokenizer_corpus)
        tok_class = "XLMRobertaTokenizer"
    elif shape.kind == "dense":
        cfg = transformers.BertConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
            max_position_embeddings=shape.max_length, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
        tok, specials = _bert_tokenizer(shape.tokenizer_vocab, seed)
        tok_class = "BertTokenizer"
    else:
        raise ValueError(f"unknown model kind {shape.kind!r}: use 'm3', 'dense' or 'reranker'")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tok_class, "model_max_length": shape.max_length, **specials}, indent=1))
    if shape.kind == "reranker":  # a cross-encoder: no sentence-transformers pooling files
        return out
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": shape.max_length, "do_lower_case": False}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": shape.hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    if shape.kind == "m3":
        sparse = torch.nn.Linear(shape.hidden, 1)
        colbert = torch.nn.Linear(shape.hidden, shape.hidden)
        torch.save(sparse.state_dict(), out / "sparse_linear.pt")
        torch.save(colbert.state_dict(), out / "colbert_linear.pt")
    return out
