"""Retrieval evaluation on the BEIR/MTEB data shipped in ``bench/data``: load a task, score a dense ranking, nDCG@10.

MTEB protocol: document text is ``(title + " " + text).strip()``, queries as they are, cosine
similarity, nDCG@10 with trec_eval's gain (the qrel grade) and log2 discount, averaged over the
queries that have judgements.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATA", "SCIFACT", "XQUAD_EN", "RetrievalTask", "checked", "load_task", "ndcg_at_k", "rank"]

DATA = Path(__file__).resolve().parent / "data"  # shipped with the repository: a clone needs nothing beside it
SCIFACT = DATA / "scifact"
XQUAD_EN = DATA / "xquad-en"


@dataclass(frozen=True)
class RetrievalTask:
    doc_ids: list[str]
    docs: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}


def checked(folder: str | Path) -> Path:
    """``folder`` after checking every file its SHA256SUMS lists (an edited or truncated file would shift scores)."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"{sums} is missing: evaluation data folders carry a SHA256SUMS of their files")
    for line in sums.read_text().splitlines():
        want, name = line.split(maxsplit=1)
        path = folder / name.lstrip("*")
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != want:
            raise ValueError(f"{path}: SHA-256 {got} != {want} in {sums}; restore the file from git "
                             f"(git checkout -- {path})")
    return folder


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [json.loads(line) for line in f if line.strip()]


def load_task(folder: str | Path) -> RetrievalTask:
    """A task folder with corpus.jsonl[.gz], queries.jsonl, qrels.tsv and SHA256SUMS (queries without qrels dropped)."""
    folder = checked(folder)
    corpus_path = folder / "corpus.jsonl.gz" if (folder / "corpus.jsonl.gz").exists() else folder / "corpus.jsonl"
    corpus = _jsonl(corpus_path)
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    queries = [q for q in _jsonl(folder / "queries.jsonl") if q["_id"] in qrels]
    return RetrievalTask(doc_ids=[d["_id"] for d in corpus],
                         docs=[(d.get("title", "") + " " + d["text"]).strip() for d in corpus],
                         query_ids=[q["_id"] for q in queries], queries=[q["text"] for q in queries], qrels=qrels)


def rank(query_vecs: np.ndarray, doc_vecs: np.ndarray, k: int = 10) -> np.ndarray:
    """Top-k document indices per query by cosine (inputs L2-normalised), best first."""
    scores = query_vecs @ doc_vecs.T  # (Q, H) @ (H, D) -> (Q, D)
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, 1)


def ndcg_at_k(task: RetrievalTask, ranking: np.ndarray, k: int = 10) -> float:
    """Mean nDCG@k (trec_eval definition) over the task's judged queries, as a percentage."""
    total = 0.0
    for qi, qid in enumerate(task.query_ids):
        rel = task.qrels[qid]
        gains = [rel.get(task.doc_ids[d], 0) for d in ranking[qi, :k]]
        dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted(rel.values(), reverse=True)[:k]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        total += dcg / idcg if idcg > 0 else 0.0
    return 100.0 * total / len(task.query_ids)
