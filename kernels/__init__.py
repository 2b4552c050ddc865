"""Numpy scoring kernels for BGE embeddings: ColBERT MaxSim, lexical matching, hybrid scores, a packed index.

Everything is pure numpy (no scipy, numba or torch) and nothing runs at import time. Formulas follow
FlagEmbedding's ``BGEM3FlagModel`` (see DESIGN.md); batched forms score one or many queries against
packed documents without a Python loop per document.
"""

from __future__ import annotations

from ._errors import KernelInputError
from .hybrid import MODES, combine_scores
from .index import PackedIndex
from .lexical import PackedLexical, lexical_matching_score, lexical_scores, pack_lexical
from .maxsim import colbert_score, maxsim, quantize_int8, topk

__all__ = [
    "KernelInputError",
    "MODES",
    "PackedIndex",
    "PackedLexical",
    "colbert_score",
    "combine_scores",
    "lexical_matching_score",
    "lexical_scores",
    "maxsim",
    "pack_lexical",
    "quantize_int8",
    "topk",
]
