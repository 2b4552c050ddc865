"""FlagEmbedding's FlagReranker math in PyTorch fp32, written independently of bge_edge.

Mirrors FlagEmbedding 1.3/1.4 ``BaseReranker.compute_score_single_gpu`` (use_fp16=False) with transformers 4.x:
  query ids   = tokenizer(query, add_special_tokens=False, truncation=True, max_length=query_max_length)
  passage ids = tokenizer(passage, add_special_tokens=False, truncation=True, max_length=max_length)
  inputs      = tokenizer.prepare_for_model(q, p, truncation="only_second", max_length=max_length)
                i.e. <s> q </s> </s> p </s>, the passage cut from the right by the overflow when it is longer
                than the overflow (else transformers logs an error and cuts nothing)
  score       = XLMRobertaForSequenceClassification(...).logits.view(-1); normalize: 1 / (1 + exp(-score))
transformers 5 dropped ``prepare_for_model`` from fast tokenizers, so its truncation is written out here.
Each pair runs alone (no padding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


class RerankerReference:
    def __init__(self, model_dir: Path) -> None:
        import torch
        import transformers
        from tokenizers import Tokenizer

        self.torch = torch
        self.model = transformers.XLMRobertaForSequenceClassification.from_pretrained(
            str(model_dir), attn_implementation="eager").eval()
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        specials = json.loads((model_dir / "special_tokens_map.json").read_text())
        self.cls = self.tok.token_to_id(specials["cls_token"])
        self.sep = self.tok.token_to_id(specials["sep_token"])

    def inputs(self, query: str, passage: str, max_length: int, query_max_length: int | None = None) -> list[int]:
        qmax = max_length * 3 // 4 if query_max_length is None else query_max_length
        q = self.tok.encode(query, add_special_tokens=False).ids[:qmax]
        p = self.tok.encode(passage, add_special_tokens=False).ids[:max_length]
        total = len(q) + len(p) + 4  # XLM-R num_special_tokens_to_add(pair=True)
        if total > max_length:
            remove = total - max_length
            if len(p) > remove:  # transformers' truncate_sequences, ONLY_SECOND, truncation_side right
                p = p[:-remove]
        return [self.cls] + q + [self.sep, self.sep] + p + [self.sep]

    def compute_score(self, pairs: Sequence[tuple[str, str]], max_length: int = 512,
                      query_max_length: int | None = None, normalize: bool = False) -> list[float]:
        torch = self.torch
        out = []
        with torch.no_grad():
            for q, p in pairs:
                ids = torch.tensor([self.inputs(q, p, max_length, query_max_length)])
                logit = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.view(-1).float()
                out.append(float(logit.numpy()[0]))
        if normalize:
            out = [float(1 / (1 + np.exp(-s))) for s in out]
        return out
