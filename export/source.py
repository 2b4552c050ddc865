"""Read a source model folder (Hugging Face layout) and decide what to export: kind, heads, pooling,
max length, special tokens, query instruction. Loads the PyTorch modules for tracing."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bge_edge.runtime.errors import ArtifactError

__all__ = ["SourceModel", "resolve_model", "inspect_model", "load_torch_modules"]

M3_HEAD_FILES = ("sparse_linear.pt", "colbert_linear.pt")
BGE_EN_INSTRUCTION = "Represent this sentence for searching relevant passages: "
BGE_ZH_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


class SourceError(ArtifactError):
    """The source model cannot be exported as asked."""


@dataclass(frozen=True)
class SourceModel:
    """What export needs to know about a source model folder."""

    path: Path
    model_id: str
    revision: str | None
    kind: str  # "m3" | "dense" | "reranker"
    model_type: str
    heads: tuple[str, ...]
    pooling: str
    hidden_size: int
    num_heads: int
    max_length: int
    special_tokens: dict[str, int | None]
    query_instruction: str


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
GENERIC_FOLDER_NAMES = frozenset({"model", "models", "snapshot", "checkpoint", "weights", "hf", "src", "source"})


def local_model_id(path: Path) -> tuple[str, str | None]:
    """(model id, revision) for a local folder: what the manifest, /v1/models and logs will call it.

    In order: a Hugging Face cache folder (``models--ORG--NAME/snapshots/REV``) gives ORG/NAME at REV; the model
    card (README.md) gives the hub id it uses for its own ``# title`` (``sentence-transformers/all-MiniLM-L6-v2``);
    config.json ``_name_or_path`` when it is a hub id; else the folder name, or its parent's when the name is
    generic (``model``). ``_name_or_path`` comes after the card because fine-tuned models often carry their base
    model's id there (all-MiniLM-L6-v2 says ``nreimers/MiniLM-L6-H384-uncased``).
    """
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        org_name = path.parent.parent.name[len("models--"):].split("--", 1)
        if len(org_name) == 2:
            rev = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
            return "/".join(org_name), rev
    card = path / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        title = re.search(r"^# +([\w.-]+) *$", text, flags=re.M)
        if title:
            named = re.search(r"[\"'(/\s]([A-Za-z0-9][\w.-]*/" + re.escape(title.group(1)) + r")[\"')\s]", text)
            if named:
                return named.group(1), None
    config = path / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and _HUB_ID.fullmatch(name) and not Path(name).exists():
            return name, None
    if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
        return path.parent.name, None
    return path.name, None


def resolve_model(model: str, model_id: str | None = None) -> tuple[Path, str, str | None]:
    """A local folder as is, or a hub id downloaded with huggingface_hub; returns (path, id, revision).

    ``model_id`` (``--model-id``) overrides the id that would be derived (see ``local_model_id``).
    """
    if model_id is not None and not model_id.strip():
        raise SourceError("--model-id is empty; pass the name the artifact should carry, e.g. BAAI/bge-m3.")
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SourceError(f"{model!r} is a file, not a model folder; pass a folder in Hugging Face layout "
                              f"(config.json, weights, tokenizer.json).")
        derived, revision = local_model_id(p.resolve())
        return p.resolve(), model_id or derived, revision
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SourceError(f"model folder {model!r} does not exist. Pass a local folder in Hugging Face layout, "
                          f"or a hub id such as BAAI/bge-m3.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(f"{model!r} is not a local folder and huggingface_hub is not installed; pass a local "
                          f"folder, or `pip install 'bge-edge[export]'`.") from None
    try:
        local = Path(snapshot_download(model, allow_patterns=[
            "*.json", "*.safetensors", "*.pt", "*.txt", "*.model", "1_Pooling/*"]))
    except Exception as e:  # network, auth, missing repo: all mean "cannot fetch"
        raise SourceError(f"could not download {model!r} from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Offline, download the model "
                          f"elsewhere and pass its local folder instead.") from None
    return local, model_id or model, local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object")
    return data


def _pooling(root: Path) -> str:
    cfg_path = root / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return "cls"
    cfg = _read_json(cfg_path)
    modes = [k for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                         "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                         "pooling_mode_lasttoken") if cfg.get(k)]
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    raise SourceError(f"{cfg_path} asks for pooling {modes or 'none'}; bge-edge supports CLS or mean pooling only.")


def _max_length(root: Path, config: dict[str, Any], model_type: str) -> int:
    positions = int(config.get("max_position_embeddings", 512)) - (2 if model_type == "xlm-roberta" else 0)
    for fname, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        f = root / fname
        if f.is_file():
            v = _read_json(f).get(key)
            if isinstance(v, int) and 0 < v <= 1_000_000:
                return min(v, positions)
    return positions


def _special_tokens(root: Path, tokenizer: Any) -> dict[str, int | None]:
    names: dict[str, Any] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        if (root / fname).is_file():
            names.update({k: v for k, v in _read_json(root / fname).items() if k.endswith("_token")})

    def tid(*keys: str) -> int | None:
        for k in keys:
            v = names.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and tokenizer.token_to_id(v) is not None:
                return int(tokenizer.token_to_id(v))
        return None

    return {"cls": tid("cls_token", "bos_token"), "eos": tid("eos_token", "sep_token"), "pad": tid("pad_token"),
            "unk": tid("unk_token"), "mask": tid("mask_token")}


def _query_instruction(root: Path, model_id: str) -> str:
    st_cfg = root / "config_sentence_transformers.json"
    if st_cfg.is_file():
        prompts = _read_json(st_cfg).get("prompts") or {}
        if isinstance(prompts, dict) and isinstance(prompts.get("query"), str) and prompts["query"]:
            return prompts["query"]
    name = model_id.lower()
    if re.search(r"bge-(small|base|large)-en(-v1\.5)?$", name):
        return BGE_EN_INSTRUCTION
    if re.search(r"bge-(small|base|large)-zh(-v1\.5)?$", name):
        return BGE_ZH_INSTRUCTION
    return ""


def inspect_model(path: Path, model_id: str, revision: str | None = None, kind: str = "auto",
                  query_instruction: str | None = None, max_length: int | None = None) -> SourceModel:
    """Decide kind, heads and settings for the folder at ``path`` (DESIGN.md "Models")."""
    from tokenizers import Tokenizer

    if not (path / "config.json").is_file():
        inner = sorted(d for d in path.iterdir() if (d / "config.json").is_file()) if path.is_dir() else []
        hint = f" Did you mean {inner[0]}?" if len(inner) == 1 else \
            f" These subfolders are model folders: {[d.name for d in inner]}." if inner else ""
        raise SourceError(f"{path} has no config.json: not a Hugging Face model folder.{hint}")
    config = _read_json(path / "config.json")
    model_type = str(config.get("model_type", ""))
    if model_type not in ("xlm-roberta", "bert"):
        raise SourceError(f"unknown architecture {model_type or '(none)'!r} in {path / 'config.json'}: bge-edge "
                          f"exports XLM-RoBERTa (BGE-M3) and BERT (bge-*-v1.5, all-MiniLM) models.")
    if not (path / "tokenizer.json").is_file():
        raise SourceError(f"{path} has no tokenizer.json; bge-edge needs the fast-tokenizer file.")
    have_heads = [f for f in M3_HEAD_FILES if (path / f).is_file()]
    cross_encoder = _is_cross_encoder(config)
    if kind == "auto":
        kind = "reranker" if cross_encoder else "m3" if model_type == "xlm-roberta" else "dense"
    if kind == "reranker":
        _check_reranker(path, config, model_type, cross_encoder)
        heads: tuple[str, ...] = ("score",)
    elif kind == "m3":
        if model_type != "xlm-roberta":
            raise SourceError(f"kind 'm3' needs an XLM-RoBERTa model; {path} is {model_type!r}.")
        missing = [f for f in M3_HEAD_FILES if f not in have_heads]
        if missing:
            raise SourceError(f"BGE-M3 head file(s) {missing} missing from {path}: an M3 model needs both "
                              f"{list(M3_HEAD_FILES)}. Copy them from the BAAI/bge-m3 repository, or pass "
                              f"--kind dense to export the dense head only.")
        heads = ("dense", "sparse", "colbert")
    elif kind == "dense":
        heads = ("dense",)
    else:
        raise SourceError(f"unknown kind {kind!r}: use auto, m3, dense or reranker.")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    limit = _max_length(path, config, model_type)
    if max_length is not None:
        if not 2 <= max_length <= limit:
            raise SourceError(f"--max-length {max_length} is outside 2..{limit}, the model's position limit.")
        limit = max_length
    specials = _special_tokens(path, tok)
    if specials["pad"] is None:
        raise SourceError(f"{path}: no pad token found in tokenizer_config.json / special_tokens_map.json.")
    return SourceModel(
        path=path, model_id=model_id, revision=revision, kind=kind, model_type=model_type, heads=heads,
        pooling="cls" if kind == "reranker" else _pooling(path), hidden_size=int(config["hidden_size"]),
        num_heads=int(config["num_attention_heads"]), max_length=limit, special_tokens=specials,
        query_instruction=("" if kind == "reranker" else _query_instruction(path, model_id))
        if query_instruction is None else query_instruction)


def _is_cross_encoder(config: dict[str, Any]) -> bool:
    """A sequence-classification model (bge-reranker-*: XLMRobertaForSequenceClassification)."""
    archs = config.get("architectures") or []
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                           for a in archs)


def _num_labels(config: dict[str, Any]) -> int:
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    return int(config.get("num_labels", 2))  # transformers' default


def _check_reranker(path: Path, config: dict[str, Any], model_type: str, cross_encoder: bool) -> None:
    """Kind ``reranker``: an XLM-RoBERTa sequence classifier with one label (bge-reranker-v2-m3/base/large)."""
    if not cross_encoder:
        raise SourceError(f"kind 'reranker' needs a sequence-classification model (config.json architectures "
                          f"*ForSequenceClassification); {path} lists {config.get('architectures')}.")
    if model_type != "xlm-roberta":
        raise SourceError(f"bge-edge exports XLM-RoBERTa rerankers (bge-reranker-v2-m3, -base, -large); {path} is "
                          f"{model_type!r}, whose pair inputs need token type ids this export does not trace.")
    n = _num_labels(config)
    if n != 1:
        raise SourceError(f"{path} is a sequence classifier with {n} labels; a reranker has exactly one (its logit "
                          f"is the relevance score). bge-edge exports only single-label cross-encoders.")


def load_torch_modules(src: SourceModel) -> tuple[Any, Any, Any]:
    """(encoder, sparse_linear, colbert_linear) in fp32 eval mode; heads are None for dense models and rerankers
    (whose "encoder" is the whole XLMRobertaForSequenceClassification).

    Head ``.pt`` files are read with ``torch.load(weights_only=True)``: no pickle code runs.
    """
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = transformers.XLMRobertaModel if src.model_type == "xlm-roberta" else transformers.BertModel
    kw: dict[str, Any] = {"add_pooling_layer": False}
    if src.kind == "reranker":  # the whole classifier: encoder + dense/tanh/out_proj head on <s>
        cls, kw = transformers.XLMRobertaForSequenceClassification, {}
    try:
        encoder = cls.from_pretrained(str(src.path), **kw, attn_implementation="eager",
                                      torch_dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load the weights in {src.path}: {e}") from None
    if src.kind != "m3":
        return encoder, None, None
    linears = []
    for fname, out_dim in (("sparse_linear.pt", 1), ("colbert_linear.pt", src.hidden_size)):
        lin = torch.nn.Linear(src.hidden_size, out_dim)
        try:
            state = torch.load(src.path / fname, map_location="cpu", weights_only=True)
            lin.load_state_dict(state)
        except Exception as e:
            raise SourceError(f"cannot read head {src.path / fname} as Linear({src.hidden_size}, {out_dim}) "
                              f"weights: {e}") from None
        linears.append(lin.eval())
    return encoder, linears[0], linears[1]
