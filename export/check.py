"""Export checks itself: run each written graph on a calibration text set and measure it against the
PyTorch model (fp32 parity) or against the fp32 graph (int8/fp16 cosine). The numbers go into the
manifest; graphs outside the thresholds are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CALIBRATION_TEXTS", "PARITY_TOLERANCE", "MIN_INT8_COSINE", "INT8_TARGET_COSINE", "MIN_FP16_COSINE",
           "run_graph", "run_torch", "parity", "agreement", "quality", "calibration_pairs", "tokenize_pairs"]

PARITY_TOLERANCE = 1e-4  # fp32 graph vs PyTorch, max abs diff; measured ~1e-6 on real models (tests use 1e-5)
MIN_INT8_COSINE = 0.99  # mean dense cosine of INT8 to FP32 below which export refuses to write the artifact
INT8_TARGET_COSINE = 0.999  # INT8 quality export aims for, trading a little speed (export/pipeline.py _int8)
MIN_FP16_COSINE = 0.999

CALIBRATION_TEXTS = [
    "",
    "What is BGE M3?",
    "Defination of BM25",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms "
    "appearing in each document.",
    "The mitochondria is the powerhouse of the cell; it produces ATP through oxidative phosphorylation.",
    "Vitamin D deficiency is associated with an increased risk of respiratory infections in children.",
    "How do I reset my router password?",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Die Katze sitzt auf der Matte und schaut aus dem Fenster.",
    "Le chat est assis sur le tapis et regarde par la fenêtre.",
    "El gato está sentado en la alfombra y mira por la ventana.",
    "Кошка сидит на коврике и смотрит в окно.",
    "猫坐在垫子上，看着窗外。",
    "猫はマットの上に座って窓の外を見ています。",
    "고양이가 매트 위에 앉아 창밖을 보고 있다.",
    "القطة تجلس على السجادة وتنظر من النافذة.",
    "החתול יושב על השטיח ומסתכל מהחלון.",
    "बिल्ली चटाई पर बैठी है और खिड़की से बाहर देख रही है।",
    "แมวนั่งอยู่บนเสื่อและมองออกไปนอกหน้าต่าง",
    "Emoji test 🙂🚀👍🏽 🇩🇪 ❤️ 🧬",
    "repeat repeat repeat repeat repeat repeat repeat repeat",
    "Patients receiving the treatment showed a 23% reduction in symptoms (p < 0.01, n = 412).",
    "def encode(texts): return [model(t) for t in texts]  # code snippet",
    "Transformer models compute attention over every pair of tokens, so memory grows with the square of "
    "the sequence length unless the computation is chunked. " * 6,
]


def _pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    n, L = len(ids), max(len(x) for x in ids)
    input_ids = np.full((n, L), pad_id, dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return input_ids, mask


def tokenize(tokenizer_path: Path, texts: list[str], max_length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return [e.ids for e in tok.encode_batch(texts)]


def calibration_pairs() -> list[tuple[str, str]]:
    """(query, passage) pairs for rerankers: each calibration text against itself, a neighbour and a far text,
    so relevant and irrelevant pairs (and the empty text on either side) are all present."""
    t, n = CALIBRATION_TEXTS, len(CALIBRATION_TEXTS)
    return [(t[i], t[j]) for i in range(n) for j in dict.fromkeys((i, (i + 1) % n, (i * 7 + 3) % n))]


def tokenize_pairs(tokenizer_path: Path, pairs: list[tuple[str, str]], max_length: int, cls_id: int,
                   eos_id: int) -> list[list[int]]:
    """Pair inputs exactly as the runtime's Reranker builds them (FlagReranker's truncation)."""
    from bge_edge.runtime.reranker import pair_ids
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.no_truncation()
    q = [e.ids for e in tok.encode_batch([a for a, _ in pairs], add_special_tokens=False)]
    p = [e.ids for e in tok.encode_batch([b for _, b in pairs], add_special_tokens=False)]
    return [pair_ids(a, b, cls_id, eos_id, max_length, max_length * 3 // 4)[0] for a, b in zip(q, p)]


def run_graph(path: Path, ids: list[list[int]], pad_id: int, batch: int = 8) -> list[list[np.ndarray]]:
    """Per text, the graph's outputs with padding stripped (dense (H,), sparse (L,), colbert (L-1, H))."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out: list[list[np.ndarray]] = []
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        input_ids, mask = _pad(chunk, pad_id)
        res = sess.run(None, {"input_ids": input_ids, "attention_mask": mask})
        for j, x in enumerate(chunk):
            n = len(x)
            row = [res[0][j]]
            if len(res) > 1:
                row += [res[1][j, :n], res[2][j, : n - 1]]
            out.append(row)
    return out


def run_torch(module: Any, ids: list[list[int]]) -> list[list[np.ndarray]]:
    """The traced PyTorch module on each text alone (no padding), fp32."""
    import torch

    out = []
    with torch.no_grad():
        for x in ids:
            t = torch.tensor([x], dtype=torch.long)
            res = module(t, torch.ones_like(t))
            out.append([r[0].numpy() for r in res])
    return out


def _is_score(run: list[list[np.ndarray]]) -> bool:
    """A reranker's run: one scalar score per input."""
    return len(run[0]) == 1 and np.ndim(run[0][0]) == 0


def parity(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> dict[str, float]:
    """Max abs difference per output between two runs of the same texts."""
    names = ["score"] if _is_score(a) else ["dense", "sparse", "colbert"]
    return {f"{names[k]}_max_abs_diff": float(max(np.abs(x[k] - y[k]).max() for x, y in zip(a, b)))
            for k in range(len(a[0]))}


def _cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    num = (x * y).sum(-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def agreement(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    """Dense cosine (mean, min), ColBERT row cosine (mean), sparse max abs diff, vs the reference run.

    Rerankers: Pearson and Spearman correlation of the scores over the calibration pairs, max abs diff, and how
    many pairs change order (pairwise order agreement); ``quality`` reads the Pearson correlation.
    """
    if _is_score(ref):
        return _score_agreement(np.array([float(r[0]) for r in ref]), np.array([float(g[0]) for g in got]))
    dense = np.array([_cos(r[0], g[0]) for r, g in zip(ref, got)])
    res = {"dense_cosine_mean": round(float(dense.mean()), 6), "dense_cosine_min": round(float(dense.min()), 6)}
    if len(ref[0]) > 1:
        col = np.concatenate([_cos(r[2], g[2]) for r, g in zip(ref, got)])
        res["colbert_cosine_mean"] = round(float(col.mean()), 6)
        res["sparse_max_abs_diff"] = round(float(max(np.abs(r[1] - g[1]).max() for r, g in zip(ref, got))), 6)
    return res


def _score_agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    def corr(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        den = float(np.sqrt((x * x).sum() * (y * y).sum()))
        return float((x * y).sum() / den) if den > 0 else 1.0

    def ranks(x: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)

    d_ref, d_got = np.sign(ref[:, None] - ref[None, :]), np.sign(got[:, None] - got[None, :])
    off = ~np.eye(len(ref), dtype=bool)
    return {"score_pearson": round(corr(ref, got), 6), "score_spearman": round(corr(ranks(ref), ranks(got)), 6),
            "score_max_abs_diff": round(float(np.abs(ref - got).max()), 6),
            "score_std": round(float(ref.std()), 6),
            "pair_order_agreement": round(float((d_ref == d_got)[off].mean()) if len(ref) > 1 else 1.0, 6)}


def quality(acc: dict[str, float]) -> float:
    """The number a quantised graph must clear: mean dense cosine (embedders) or score Pearson (rerankers)."""
    return float(acc["dense_cosine_mean"] if "dense_cosine_mean" in acc else acc["score_pearson"])
