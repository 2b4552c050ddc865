"""Build the ONNX graphs: trace the model with its heads, fuse for CPU, convert to FP16 (INT8: int8.py).

The traced graph computes DESIGN.md's output semantics end to end, so the runtime only aggregates
sparse weights per token id:
  dense   [batch, H]         pooled (CLS or mean) hidden state, L2-normalised
  sparse  [batch, seq]       relu(sparse_linear(h_t)) * mask              (m3 only)
  colbert [batch, seq-1, H]  normalize(colbert_linear(h_1..) * mask_1..)  (m3 only)
  score   [batch]            a reranker's raw logit (XLMRobertaForSequenceClassification, one label)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .source import SourceModel

__all__ = ["OPSET", "graph_module", "trace_onnx", "fuse_for_cpu", "convert_fp16", "FUSED_OPS",
           "LINEAR_ATTENTION_ABOVE", "add_linear_attention_to"]

OPSET = 17
FUSED_OPS = ("Attention", "SkipLayerNormalization")  # must appear after fusion, else fusion silently failed
# Models reading more tokens than this get the linear-memory attention branch (longattn.py). At 512 tokens
# the score matrix is 12 heads x 512^2 x 4 B = 12 MiB per text: bge-small/MiniLM do not need it.
LINEAR_ATTENTION_ABOVE = 512


class FusionError(RuntimeError):
    """ONNX Runtime's transformer optimiser did not fuse what it should have."""


def graph_module(src: SourceModel, encoder: Any, sparse: Any, colbert: Any) -> Any:
    import torch
    import torch.nn.functional as F

    if src.kind == "reranker":
        class RerankerGraph(torch.nn.Module):
            """score [batch] = the raw logit of XLMRobertaForSequenceClassification (one label)."""

            def __init__(self) -> None:
                super().__init__()
                self.model = encoder

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [batch, 1]
                return (logits.reshape(-1),)

        return RerankerGraph().eval()

    class BgeGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.sparse_linear, self.colbert_linear = encoder, sparse, colbert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            maskf = attention_mask.to(h.dtype)
            if src.pooling == "cls":
                pooled = h[:, 0]
            else:  # sentence-transformers mean pooling
                pooled = (h * maskf.unsqueeze(-1)).sum(1) / maskf.sum(1, keepdim=True).clamp(min=1e-9)
            dense = F.normalize(pooled, dim=-1)
            if self.sparse_linear is None:
                return (dense,)
            token_weights = torch.relu(self.sparse_linear(h)).squeeze(-1) * maskf
            colbert_vecs = self.colbert_linear(h[:, 1:]) * maskf[:, 1:].unsqueeze(-1)
            return dense, token_weights, F.normalize(colbert_vecs, dim=-1)

    return BgeGraph().eval()


def output_names(src: SourceModel) -> list[str]:
    if src.kind == "reranker":
        return ["score"]
    return ["dense", "sparse", "colbert"] if src.kind == "m3" else ["dense"]


def trace_onnx(src: SourceModel, modules: tuple[Any, Any, Any], out_path: Path) -> None:
    """Trace the fp32 model with dynamic batch and sequence axes (TorchScript exporter, opset 17).

    Graphs larger than 2 GB are written with one external-data file beside them; other files in the folder are
    left alone.
    """
    import warnings

    import torch

    before = set(out_path.parent.iterdir())
    model = graph_module(src, *modules)
    ids = torch.tensor([[src.special_tokens["cls"] or 0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.long)
    names = output_names(src)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "dense": {0: "batch"},
            "score": {0: "batch"},
            "sparse": {0: "batch", 1: "seq"}, "colbert": {0: "batch", 1: "seq_minus_1"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(out_path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=names,
                          dynamic_axes={k: v for k, v in axes.items() if k in names or k.startswith(("input", "att"))},
                          do_constant_folding=True)
    _consolidate_external_data(out_path, [p for p in out_path.parent.iterdir() if p not in before and p != out_path])


def _consolidate_external_data(path: Path, others: list[Path]) -> None:
    """The TorchScript exporter writes one file per tensor (``others``) for big models; rewrite as graph + one
    .data file."""
    import onnx

    if not others:
        return
    model = onnx.load(str(path), load_external_data=True)
    for p in others:
        p.unlink()
    save(model, path)


def save(model: Any, path: Path) -> list[str]:
    """Save an ONNX model; returns extra files written (external data when the graph exceeds 2 GB)."""
    import onnx

    if _can_size(model) and model.ByteSize() < 2_000_000_000:
        onnx.save_model(model, str(path))
        return []
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [data]


def _can_size(model: Any) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size > 2 GB messages
        return False


def fuse_for_cpu(src: SourceModel, in_path: Path, out_path: Path) -> tuple[dict[str, int], list[str]]:
    """Run ONNX Runtime's transformer optimiser (Attention, SkipLayerNorm, Gelu fusion) and check it fused.

    Returns (fused operator counts, extra files written).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(in_path), model_type="bert", num_heads=src.num_heads, hidden_size=src.hidden_size,
                         opt_level=0, use_gpu=False, only_onnxruntime=False)  # python fusion only: no extra session
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    layers = sum(1 for n in opt.model.graph.node if n.op_type == "Attention")
    missing = [op for op in FUSED_OPS if not stats.get(op)]
    if missing or layers == 0:
        raise FusionError(f"ONNX Runtime's optimiser did not fuse {missing} (got {stats}); the exported graph has "
                          f"an attention pattern it does not recognise. bge-edge exports BERT and XLM-RoBERTa "
                          f"encoders (BGE, MiniLM); please report the model id with this message.")
    if not any(o.domain == "com.microsoft" for o in opt.model.opset_import):  # fused ops live in this domain
        import onnx

        opt.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    extra = save(opt.model, out_path)
    return stats, extra


def add_linear_attention_to(path: Path, hidden_size: int) -> int:
    """Rewrite the graph file at ``path`` with the flash branch of longattn.py; external data is untouched."""
    import onnx

    from .longattn import add_linear_attention

    model = onnx.load(str(path), load_external_data=False)  # nodes only: the weights stay where they are
    n = add_linear_attention(model, hidden_size)
    if n == 0:
        raise FusionError(f"{path.name} has no fused Attention node to give a linear-memory path")
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return n


def ffn_down_projections(model: Any) -> list[str]:
    """Names of the MatMuls that read a Gelu output: the FFN down-projections, where activation outliers live."""
    gelu_outputs = {o for n in model.graph.node if "Gelu" in n.op_type for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in gelu_outputs]


def convert_fp16(in_path: Path, out_path: Path) -> list[str]:
    """Weights and compute in FP16, inputs and outputs kept as in FP32 (int64 in, float32 out); for GPUs."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(in_path), load_external_data=True))
    model.convert_float_to_float16(keep_io_types=True)
    return save(model.model, out_path)
