"""FlagEmbedding's BGEM3FlagModel math in PyTorch fp32, written independently of bge_edge.export.

Mirrors FlagEmbedding (BGE_M3 model + BGEM3FlagModel.encode, use_fp16=False):
  dense    normalize(h[:, 0])   (or sentence-transformers mean pooling when the model says so)
  sparse   relu(sparse_linear(h)); per token id keep the max; drop cls/eos/pad/unk ids and w <= 0
  colbert  normalize(colbert_linear(h[:, 1:]) * mask[:, 1:]), first (n_tokens - 1) rows
Each text runs alone (no padding), tokenised by `tokenizers` with its own truncation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class Reference:
    def __init__(self, model_dir: Path, max_length: int, pooling: str = "cls") -> None:
        import torch
        import transformers
        from tokenizers import Tokenizer

        self.torch = torch
        cfg = json.loads((model_dir / "config.json").read_text())
        cls = transformers.XLMRobertaModel if cfg["model_type"] == "xlm-roberta" else transformers.BertModel
        self.model = cls.from_pretrained(str(model_dir), add_pooling_layer=False, attn_implementation="eager").eval()
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length)
        self.pooling = pooling
        self.sparse = self.colbert = None
        H = cfg["hidden_size"]
        if (model_dir / "sparse_linear.pt").exists():
            self.sparse = torch.nn.Linear(H, 1)
            self.sparse.load_state_dict(torch.load(model_dir / "sparse_linear.pt", weights_only=True))
            self.colbert = torch.nn.Linear(H, H)
            self.colbert.load_state_dict(torch.load(model_dir / "colbert_linear.pt", weights_only=True))
        specials = json.loads((model_dir / "special_tokens_map.json").read_text()) \
            if (model_dir / "special_tokens_map.json").exists() else {}
        names = [specials.get(k) for k in ("cls_token", "eos_token", "sep_token", "pad_token", "unk_token")]
        if cfg["model_type"] == "bert":  # BERT has no eos token: FlagEmbedding's unused set is cls, pad, unk
            names = [specials.get(k) for k in ("cls_token", "pad_token", "unk_token")]
        self.unused = {self.tok.token_to_id(n if isinstance(n, str) else n["content"]) for n in names if n}

    def encode_one(self, text: str) -> dict[str, Any]:
        torch = self.torch
        F = torch.nn.functional
        enc = self.tok.encode(text)
        ids = torch.tensor([enc.ids])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            if self.pooling == "cls":
                dense = h[:, 0]
            else:
                m = mask.unsqueeze(-1).float()
                dense = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out: dict[str, Any] = {"ids": enc.ids, "dense": F.normalize(dense, dim=-1)[0].numpy()}
            if self.sparse is not None:
                tw = torch.relu(self.sparse(h))[0, :, 0].numpy()
                lex: dict[str, Any] = {}
                for w, i in zip(tw, enc.ids):  # FlagEmbedding _process_token_weights
                    if i not in self.unused and w > 0:
                        if w > lex.get(str(i), 0):
                            lex[str(i)] = w
                out["sparse"] = lex
                out["token_weights"] = tw
                c = self.colbert(h[:, 1:]) * mask[:, 1:][:, :, None].float()
                out["colbert"] = F.normalize(c, dim=-1)[0].numpy()[: len(enc.ids) - 1]
        return out


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """FlagEmbedding colbert_score: mean over query rows of the max dot product over passage rows."""
    return float((q @ p.T).max(axis=1).sum() / q.shape[0])


def lexical_score(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(sum(a[t] * b[t] for t in a if t in b))
