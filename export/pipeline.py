"""``export_model``: source folder -> verified artifact folder, written atomically.

Steps (each timed on stderr): load, trace, fuse, quantise / convert, check against the reference,
hash, write the manifest, rename the temporary folder into place. Any failure or interrupt removes
the temporary folder, so ``--out`` is either the whole artifact or absent.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import importlib.util
import math
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from bge_edge.runtime.errors import ArtifactError
from bge_edge.runtime.integrity import sha256_file
from bge_edge.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, FileEntry, GraphEntry, Manifest

from . import check, dynamic_int8, graph, int8
from . import openvino as ov_export
from .source import SourceModel, inspect_model, load_torch_modules, resolve_model

__all__ = ["export_model", "ExportError", "PRECISIONS", "FORMATS", "INT8_RECIPES"]

PRECISIONS = ("fp32", "int8", "fp16")
INT8_RECIPES = ("per-token", "dynamic")  # the first is the default (export/int8.py, export/dynamic_int8.py)
FORMATS = ("onnx", "openvino")
_TMP_PREFIX = ".bge-edge-export-"


class ExportError(ArtifactError):
    """Export refused or failed; the message says why and what to do."""


class _Progress:
    def __init__(self, stream: Any, quiet: bool) -> None:
        self.stream, self.quiet, self.start = stream, quiet, time.perf_counter()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        t = time.perf_counter()
        if not self.quiet:
            print(f"  {what} ...", file=self.stream, flush=True)
        yield
        if not self.quiet:
            print(f"  {what}: done in {time.perf_counter() - t:.1f} s", file=self.stream, flush=True)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"  {msg}", file=self.stream, flush=True)


def _check_out(out: Path, force: bool) -> tuple[int, int] | None:
    """Refuse an unusable --out; with --force, return the (device, inode) of the artifact folder to replace.

    ``--force`` replaces only a folder that a bge-edge export wrote: it has a manifest.json naming every file
    in it, so nothing the user put there (a source model, other models, their files) is ever deleted.
    """
    try:
        if out.is_symlink():
            raise ExportError(f"--out {out} is a link; pass the folder itself, or remove the link.")
        if out.exists() and not force:
            raise ExportError(f"--out {out} already exists; choose another folder or pass --force to replace it.")
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a folder; remove it or choose another path.")
        replace = _artifact_identity(out) if out.exists() else None
        probe = out.parent
        while not probe.exists():
            probe = probe.parent
        writable = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
    except OSError as e:  # e.g. a parent folder this user may not enter
        raise ExportError(f"cannot use --out {out}: {e.strerror} ({e.filename}). Choose a folder you can write.") \
            from None
    if not writable:
        raise ExportError(f"cannot write --out {out}: {probe} is not a writable folder. Choose a writable path.")
    return replace


def _artifact_identity(out: Path) -> tuple[int, int]:
    """(device, inode) of ``out`` if it is a bge-edge artifact holding only the files its manifest lists."""
    import json

    refuse = f"--out {out} is not a bge-edge artifact folder, and --force replaces only those: "
    manifest = out / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(refuse + f"it has no {MANIFEST_NAME}. Nothing was deleted; choose another --out, or "
                                   f"remove the folder yourself if you mean to.") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ExportError(refuse + f"its {MANIFEST_NAME} is not a bge-edge manifest. Nothing was deleted; choose "
                                   f"another --out.") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not isinstance(data.get("schema_version"), int):
        raise ExportError(refuse + f"its {MANIFEST_NAME} is not a bge-edge manifest. Nothing was deleted; choose "
                                   f"another --out.")
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if (p.is_file() or p.is_symlink()) and p != manifest
                     and p.relative_to(out).as_posix() not in files)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ExportError(refuse + f"it holds files its manifest does not list ({', '.join(foreign[:3])}{more}). "
                                   f"Nothing was deleted; move those files out, or choose another --out.")
    st = out.stat()
    return st.st_dev, st.st_ino


def _check_not_source(out: Path, source: Path) -> None:
    """--out may not be the source model folder, contain it, or lie inside it when it is to be replaced."""
    o, s = os.path.realpath(out), os.path.realpath(source)
    if o == s or s.startswith(o.rstrip(os.sep) + os.sep):
        raise ExportError(f"--out {out} {'is' if o == s else 'contains'} the source model folder {source}; "
                          f"exporting there would delete the source. Choose another --out.")
    if os.path.exists(o) and o.startswith(s.rstrip(os.sep) + os.sep):
        raise ExportError(f"--out {out} lies inside the source model folder {source}; --force will not replace "
                          f"anything there. Choose an --out outside the source folder.")


_OLD = "old-"  # .bge-edge-export-old-NAME-PID: the artifact --force is replacing, between the two renames


def _clean_stale_tmp(parent: Path) -> None:
    """Tidy what exports that were killed left (their process no longer exists).

    A killed export's temporary folder is removed. An artifact that a killed ``--force`` had moved aside
    (``.bge-edge-export-old-NAME-PID``) is put back at NAME when nothing is there, so a kill between the two
    renames never loses both the old and the new artifact; it is removed only when NAME holds an artifact again.
    """
    if not parent.is_dir():
        return
    for p in sorted(parent.glob(_TMP_PREFIX + "*"), key=lambda q: not q.name.startswith(_TMP_PREFIX + _OLD)):
        try:
            stem, pid_text = p.name[len(_TMP_PREFIX):].rsplit("-", 1)
            os.kill(int(pid_text), 0)
            continue  # its export is still running
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError, OverflowError):
            continue
        if stem.startswith(_OLD) and stem[len(_OLD):]:
            target = parent / stem[len(_OLD):]
            if not os.path.lexists(target):
                try:
                    _rename_noreplace(p, target)
                    continue
                except OSError:
                    continue  # leave it for the user rather than guess
            if not (target / MANIFEST_NAME).is_file():
                continue
        shutil.rmtree(p, ignore_errors=True)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (never replacing it).

    Linux: renameat2(RENAME_NOREPLACE), atomic. Elsewhere (or on file systems without it), os.rename after
    a check: POSIX rename of a folder never replaces a non-empty folder, Windows never replaces anything.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            fn = None
        if fn is not None:
            at_fdcwd, noreplace = -100, 1
            if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # supported: a real failure
                raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


# Disk space an export needs, in units of the model's fp32 weight bytes F (measured on tiny and full-shape
# models: the plain traced graph and the fused fp32 graph are ~F each and exist together; int8 ~0.3 F, fp16
# ~0.5 F; OpenVINO adds its own fp32/fp16/int8 (+ a weight-only int8 candidate)), plus 10 % and 64 MiB.
_SPACE_ONNX = {"fp32": 0.0, "int8": 0.35, "fp16": 0.5}   # beyond the 2 F of trace + fused fp32
_SPACE_OPENVINO = {"fp32": 1.0, "int8": 0.7, "fp16": 0.5}
_SPACE_SLACK = 64 << 20
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_WORDS = ("No space left on device", "File too large", "Disk quota exceeded")


def _weights_fp32_bytes(source: Path) -> int:
    """The source's weights as fp32 bytes (half-precision checkpoints count double)."""
    import json

    total = sum(p.stat().st_size for p in source.glob("*") if p.suffix in (".safetensors", ".bin", ".pt")
                and p.is_file())
    try:
        dtype = json.loads((source / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        dtype = None
    return total * 2 if dtype in ("float16", "bfloat16") else total


def _space_needed(source: Path, precisions: Sequence[str], formats: Sequence[str]) -> tuple[int, int]:
    """(bytes of free disk the export needs at its peak, bytes of its largest single file), estimated."""
    f = _weights_fp32_bytes(source)
    units = 2.0 + (sum(_SPACE_ONNX[p] for p in precisions) if "onnx" in formats else 0.0)
    if "openvino" in formats:
        units += sum(_SPACE_OPENVINO[p] for p in precisions)
    return int(f * units * 1.1) + _SPACE_SLACK, int(f * 1.05)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_space(out: Path, need: int, largest: int) -> None:
    """Refuse early when the export clearly cannot fit: too little free space, or a smaller ``ulimit -f``."""
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < need:
        raise ExportError(f"not enough disk space: this export needs about {_gb(need)} free at {probe} (graphs "
                          f"written side by side before the final rename), and {_gb(free)} is free. Free some "
                          f"space, export fewer precisions/formats, or choose an --out on another disk.")
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and soft < largest:
        raise ExportError(f"the file size limit (ulimit -f) is {_gb(soft)}, and this export writes files of about "
                          f"{_gb(largest)}; raise it (ulimit -f unlimited) and export again.")


def _disk_error(e: Exception, tmp: Path, need: int) -> ExportError | None:
    """An ExportError saying the disk filled (or a file-size limit was hit) if that is what ``e`` came from."""
    text = str(e)
    hit = isinstance(e, OSError) and e.errno in _DISK_ERRNOS or any(w in text for w in _DISK_WORDS)
    if not hit:  # libraries that swallow the OSError fail later with their own error (a protobuf DecodeError
        try:     # reading back a truncated file): judge by what is left on the disk
            hit = shutil.disk_usage(tmp).free < _SPACE_SLACK
        except OSError:
            hit = False
    if not hit:
        return None
    if isinstance(e, OSError) and e.errno == errno.EFBIG or "File too large" in text:
        return ExportError(f"the export hit the file size limit (ulimit -f) writing into {tmp.parent} "
                           f"({type(e).__name__}: {text[:160]}); nothing was written. Raise the limit "
                           f"(ulimit -f unlimited) and export again.")
    return ExportError(f"the disk filled up during the export into {tmp.parent} ({type(e).__name__}: {text[:160]}); "
                       f"nothing was written. This export needs about {_gb(need)} free there: free some space or "
                       f"choose an --out on another disk.")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    import bge_edge

    return {"bge_edge": bge_edge.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version()}


def export_model(model: str | os.PathLike[str], out: str | os.PathLike[str],
                 precisions: Sequence[str] = ("fp32", "int8"),
                 *, kind: str = "auto", force: bool = False, min_int8_cosine: float = check.MIN_INT8_COSINE,
                 query_instruction: str | None = None, max_length: int | None = None, quiet: bool = False,
                 formats: Sequence[str] = ("onnx",), model_id: str | None = None, int8_recipe: str = "per-token",
                 stream: Any = None, _after_step: Callable[[str], None] | None = None) -> Manifest:
    """Export ``model`` (local folder or hub id) to the artifact folder ``out``; return its manifest.

    ``precisions`` is any of fp32, int8, fp16; ``formats`` any of onnx, openvino (each format gets each
    precision). INT8 whose mean dense cosine to FP32 on the calibration set is below ``min_int8_cosine``
    is refused (pass 0 for random-weight benchmark models). ``model_id`` names the source in the manifest
    (default: the hub id, or what the folder says it is: ``source.local_model_id``). ``int8_recipe`` for the ONNX
    int8 graph: "per-token" (batch-invariant) or "dynamic" (faster on AVX2 without VNNI, batch-dependent; opt-in).
    """
    precisions = tuple(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ExportError(f"unknown precision(s) {bad or '(none)'}; choose from {list(PRECISIONS)}.")
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown format(s) {bad or '(none)'}; choose from {list(FORMATS)}.")
    if int8_recipe not in INT8_RECIPES:
        raise ExportError(f"unknown int8 recipe {int8_recipe!r}; choose from {list(INT8_RECIPES)}.")
    if int8_recipe != INT8_RECIPES[0] and not ("int8" in precisions and "onnx" in formats):
        raise ExportError(f"--int8-recipe {int8_recipe} is for the ONNX int8 graph, which this export does not write "
                          f"(precisions {list(precisions)}, formats {list(formats)}): add int8 to --precision and onnx "
                          f"to --format, or drop --int8-recipe.")
    from bge_edge.runtime.errors import MissingExtraError

    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"export needs {e.name!r}, which is not installed: run "
                                f"pip install 'bge-edge[export]'") from None
    if "openvino" in formats:
        need = ["openvino"] + (["nncf"] if "int8" in precisions else [])
        missing = [m for m in need if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingExtraError(f"--format openvino needs {', '.join(missing)}, not installed: run "
                                    f"pip install 'bge-edge[export,openvino]'")
    out = Path(out).expanduser().absolute()
    _clean_stale_tmp(out.parent)  # first: puts back an artifact that a killed --force had moved aside
    local = os.path.expanduser(str(model))
    if os.path.exists(local):  # a local source: say so before anything else about --out
        _check_not_source(out, Path(local))
    replace = _check_out(out, force)
    log = _Progress(stream or sys.stderr, quiet)
    note = _after_step or (lambda step: None)
    t0 = time.perf_counter()
    path, model_id, revision = resolve_model(str(model), model_id)
    _check_not_source(out, path)
    src = inspect_model(path, model_id, revision, kind=kind, query_instruction=query_instruction,
                        max_length=max_length)
    need, largest = _space_needed(src.path, precisions, formats)
    _check_space(out, need, largest)
    log.say(f"exporting {model_id} as kind={src.kind} heads={list(src.heads)} pooling={src.pooling} "
            f"max_length={src.max_length} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{_TMP_PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _export_into(src, tmp, precisions, formats, min_int8_cosine, int8_recipe, log, note)
        _finalize(tmp, out, replace)
    except BaseException as e:
        disk = _disk_error(e, tmp, need) if isinstance(e, Exception) and not isinstance(e, ArtifactError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if disk is not None:
            raise disk from None
        raise
    log.say(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def _export_into(src: SourceModel, tmp: Path, precisions: tuple[str, ...], formats: tuple[str, ...],
                 min_int8_cosine: float, int8_recipe: str, log: _Progress,
                 note: Callable[[str], None]) -> Manifest:
    work = tmp / ".work"
    (work / "trace").mkdir(parents=True)
    shutil.copyfile(src.path / "tokenizer.json", tmp / "tokenizer.json")
    with log.step("loading PyTorch model"):
        modules = load_torch_modules(src)
    note("loaded")
    traced = work / "trace" / "model.onnx"
    with log.step("tracing to ONNX"):
        graph.trace_onnx(src, modules, traced)
    note("traced")
    pad = int(src.special_tokens["pad"] or 0)
    if src.kind == "reranker":  # (query, passage) pairs, built as the runtime's Reranker builds them
        ids = check.tokenize_pairs(tmp / "tokenizer.json", check.calibration_pairs(), src.max_length,
                                   int(src.special_tokens["cls"] or 0), int(src.special_tokens["eos"] or 0))
    else:
        ids = check.tokenize(tmp / "tokenizer.json", check.CALIBRATION_TEXTS, src.max_length)
    with log.step("running the PyTorch reference on the calibration set"):
        ref = check.run_torch(graph.graph_module(src, *modules), ids)
    del modules  # free the PyTorch weights before fusion: peak memory is the largest of the steps, not their sum
    _release_memory()
    graphs: list[GraphEntry] = []
    if "onnx" in formats:
        graphs += _onnx_graphs(src, tmp, traced, precisions, ids, pad, ref, min_int8_cosine, int8_recipe, log, note)
    if "openvino" in formats:
        graphs += _openvino_graphs(src, tmp, traced, precisions, ids, ref, min_int8_cosine, log, note)
    shutil.rmtree(work)
    with log.step("hashing files"):
        files = {p.relative_to(tmp).as_posix(): FileEntry(size=p.stat().st_size, sha256=sha256_file(p))
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, source={"model_id": src.model_id, "revision": src.revision},
        kind=src.kind, heads=src.heads, pooling=src.pooling, hidden_size=src.hidden_size, attention_heads=src.num_heads,
        max_length=src.max_length,
        special_tokens=src.special_tokens, query_instruction=src.query_instruction, tokenizer="tokenizer.json",
        graphs=tuple(graphs), files=files,
        exporter={**_versions(), **(ov_export.versions() if "openvino" in formats else {})},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _onnx_graphs(src: SourceModel, tmp: Path, traced: Path, precisions: tuple[str, ...], ids: list[list[int]],
                 pad: int, ref: list[list[Any]], min_int8_cosine: float, int8_recipe: str, log: _Progress,
                 note: Callable[[str], None]) -> list[GraphEntry]:
    """The fused ONNX Runtime graphs (fp32, int8, fp16), each checked; the fp32 file is dropped if not asked for."""
    fp32 = tmp / "model.fp32.onnx"
    with log.step("fusing for CPU (ONNX Runtime transformer optimiser)"):
        fused_stats, fp32_extra = graph.fuse_for_cpu(src, traced, fp32)
    log.say(f"fused: {fused_stats}")
    note("fused")
    _release_memory()  # the optimiser's copies of the graph
    with log.step("checking fp32 graph against PyTorch"):
        got32 = check.run_graph(fp32, ids, pad)
        par = check.parity(ref, got32)
    log.say(f"fp32 parity: {par}")
    worst = max(par.values())
    if worst > check.PARITY_TOLERANCE:
        raise ExportError(f"the fp32 graph differs from PyTorch by {worst:.2e} (> {check.PARITY_TOLERANCE:.0e}); "
                          f"refusing to write it. This is a bug in the export: please report it.")
    long_path = src.max_length > graph.LINEAR_ATTENTION_ABOVE
    graphs = []
    quant_note = {"method": "none"}
    graphs_files: dict[str, list[str]] = {"fp32": fp32_extra}
    if "fp32" in precisions:
        graphs.append(GraphEntry(file=fp32.name, format="onnx", precision="fp32", opset=graph.OPSET, cpu_target="any",
                                 external_data=tuple(fp32_extra), fused=True, quantization=quant_note,
                                 accuracy={"reference": "pytorch fp32", "n_texts": len(ids), **par}))
    if "int8" in precisions:
        g, files = _int8(src, tmp, fp32, ids, pad, got32, min_int8_cosine, int8_recipe, log)
        graphs.append(g)
        graphs_files["int8"] = files
        note("int8")
    if "fp16" in precisions:
        f16 = tmp / "model.fp16.onnx"
        with log.step("converting to fp16"):
            extra = graph.convert_fp16(fp32, f16)
        acc = check.agreement(got32, check.run_graph(f16, ids, pad))
        log.say(f"fp16 vs fp32: {acc}")
        if check.quality(acc) < check.MIN_FP16_COSINE:
            raise ExportError(f"fp16 agreement with fp32 is {check.quality(acc)} (< {check.MIN_FP16_COSINE}); "
                              f"refusing to write it.")
        graphs.append(GraphEntry(file=f16.name, format="onnx", precision="fp16", opset=graph.OPSET, cpu_target="gpu",
                                 external_data=tuple(extra), fused=True,
                                 quantization={"method": "fp16 weights+compute"},
                                 accuracy={"reference": "onnx fp32 graph", "n_texts": len(ids), **acc}))
        note("fp16")
    if long_path:
        graphs = [_with_linear_attention(src, tmp, g, ids, pad, got32, min_int8_cosine, log)
                  if g.precision in ("fp32", "int8") else g for g in graphs]
    if "fp32" not in precisions:
        for f in [fp32, *(tmp / e for e in fp32_extra)]:
            f.unlink()
    return graphs


def _openvino_graphs(src: SourceModel, tmp: Path, traced: Path, precisions: tuple[str, ...], ids: list[list[int]],
                     ref: list[list[Any]], min_cos: float, log: _Progress,
                     note: Callable[[str], None]) -> list[GraphEntry]:
    """OpenVINO IR graphs converted from the plain traced graph, each checked against PyTorch (see openvino.py)."""
    folder = tmp / ov_export.FOLDER
    graphs = []
    with log.step("converting the plain traced graph to OpenVINO IR"):
        model = ov_export.convert(traced)
    for prec in (p for p in ("fp32", "fp16") if p in precisions):
        xml = folder / f"model.{prec}.xml"
        with log.step(f"writing and checking the OpenVINO {prec} graph"):
            extra = ov_export.save(model, xml, compress_to_fp16=prec == "fp16")
            got, execution = ov_export.run_ir(xml, prec, ids)
        if prec == "fp32":
            acc: dict[str, Any] = check.parity(ref, got)
            bad = max(acc.values()) > check.PARITY_TOLERANCE
        else:
            acc = check.agreement(ref, got)
            bad = check.quality(acc) < check.MIN_FP16_COSINE
        log.say(f"openvino {prec} ({execution} execution) vs PyTorch: {acc}")
        if bad:
            raise ExportError(f"the OpenVINO {prec} graph disagrees with PyTorch ({acc}); refusing to write it. "
                              f"Export --format onnx only, and please report this.")
        graphs.append(GraphEntry(
            file=xml.relative_to(tmp).as_posix(), format="openvino", precision=prec, cpu_target=_OV_TARGET,
            external_data=tuple(extra),
            quantization={"method": "none" if prec == "fp32" else "fp16 weights (compress_to_fp16)",
                          "execution": ov_export.EXECUTION_PRECISION[prec] or "OpenVINO CPU default"},
            accuracy={"reference": "pytorch fp32", "n_texts": len(ids), "measured_execution": execution, **acc}))
        note(f"openvino-{prec}")
    if "int8" in precisions:
        del model
        graphs.append(_openvino_int8(tmp, traced, ids, ref, min_cos, log))
        note("openvino-int8")
    return graphs


_OV_TARGET = "x86-64/arm64 (OpenVINO CPU plugin); int8 fastest with AVX512-VNNI/AMX"


def _openvino_int8(tmp: Path, traced: Path, ids: list[list[int]], ref: list[list[Any]], min_cos: float,
                   log: _Progress) -> GraphEntry:
    """Measure static and weight-only INT8 on the calibration texts; keep static (faster) when it clears the bar."""
    xml = tmp / ov_export.FOLDER / "model.int8.xml"
    spare = tmp / ".work" / "ov-weight-only" / "model.int8.xml"
    measured: dict[str, dict[str, Any]] = {}
    for method, path, make in (("static", xml, ov_export.quantize_static),
                               ("weight_only", spare, lambda m, _ids: ov_export.compress_weights(m))):
        with log.step(f"quantising the OpenVINO graph to int8 ({method.replace('_', '-')}, NNCF)"):
            ov_export.save(make(ov_export.convert(traced), ids), path, compress_to_fp16=False)
            got, execution = ov_export.run_ir(path, "int8", ids)
        measured[method] = {**check.agreement(ref, got), "measured_execution": execution}
        log.say(f"openvino int8 {method}: {measured[method]}")
        _release_memory()
    chosen = next((m for m in ("static", "weight_only") if check.quality(measured[m]) >= min_cos), None)
    if chosen is None:
        raise ExportError(
            f"OpenVINO int8 agreement with PyTorch fp32 (mean dense cosine, or score Pearson for rerankers) is "
            f"{check.quality(measured['static'])} (static) and {check.quality(measured['weight_only'])} (weight-only), "
            f"both under {min_cos}; refusing to "
            f"write it. Export fp16/fp32 instead, or pass --min-int8-cosine 0 if the weights are random (benchmarks).")
    if chosen == "weight_only":
        os.replace(spare, xml)
        os.replace(spare.with_suffix(".bin"), xml.with_suffix(".bin"))
    quant = {"method": f"nncf {chosen.replace('_', '-')} int8",
             "weights": "int8 per output channel" + (", symmetric" if chosen == "static" else ", asymmetric"),
             "activations": "int8 per tensor, static scales from the calibration texts" if chosen == "static"
             else "float", "execution": ov_export.EXECUTION_PRECISION["int8"],
             "chosen": f"{chosen}: " + ("the faster one, over the bar" if chosen == "static"
                                        else "static was under the bar"),
             "candidates": measured}
    return GraphEntry(file=xml.relative_to(tmp).as_posix(), format="openvino", precision="int8", cpu_target=_OV_TARGET,
                      external_data=(xml.with_suffix(".bin").relative_to(tmp).as_posix(),),
                      quantization=quant,
                      accuracy={"reference": "pytorch fp32", "n_texts": len(ids), **measured[chosen],
                                "threshold_dense_cosine_mean": min_cos})


def _int8(src: SourceModel, tmp: Path, fp32: Path, ids: list[list[int]], pad: int, got32: list[list[Any]],
          min_cos: float, recipe: str, log: _Progress) -> tuple[GraphEntry, list[str]]:
    """Per-token INT8 (export/int8.py): all MatMuls int8; under check.INT8_TARGET_COSINE, again with the V projections
    fp32 (2-6 % slower, a third of the loss on real MiniLM); if the best is under the floor ``min_cos``, again with
    the FFN down-projections fp32 too. Keeps the best graph over the floor (so the first that meets the target);
    refuses when none is over it. Every step's figure goes into the manifest. ``recipe`` "dynamic"
    (export/dynamic_int8.py, opt-in): all MatMuls int8, then the FFN down-projections fp32 under the floor, as before.
    """
    import onnx

    i8 = tmp / "model.int8.onnx"
    plain = onnx.load(str(fp32), load_external_data=False)  # nodes of the fused fp32 graph, read once
    values, down = int8.value_projections(plain), graph.ffn_down_projections(plain)
    del plain
    dynamic = recipe == "dynamic"
    target = check.INT8_TARGET_COSINE  # per-token only: the dynamic recipe keeps its old ladder, floor only
    # (what is kept fp32, its MatMuls, the best quality so far under which this step is tried)
    if dynamic:
        ladder = [("none", [], math.inf), ("FFN down-projections", down, min_cos)]
    else:
        ladder = [("none", [], math.inf), ("V projections", values, target),
                  ("V projections and FFN down-projections", values + down, min_cos)]
    acc: dict[str, Any] = {}
    extra: list[str] = []
    quant: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    batched: list[list[Any]] = []

    def build(what: str, keep: list[str]) -> float:
        nonlocal extra, quant, acc, batched
        with log.step(f"quantising to int8, {'dynamic (per batch)' if dynamic else 'per token'}"
                      + (f" ({what} kept fp32)" if keep else "")):
            try:
                extra, quant = (dynamic_int8.write_dynamic_int8(fp32, i8, keep) if dynamic else
                                int8.write_int8(fp32, i8, ids, keep_fp32=keep))
            except ValueError as e:  # a graph form the per-token rewrite does not handle (export/int8.py)
                raise ExportError(f"cannot quantise this model to int8: {e}. Export fp32 (and fp16) instead, and "
                                  f"please report the model id with this message.") from e
        batched = check.run_graph(i8, ids, pad)
        acc = check.agreement(got32, batched)
        log.say(f"int8 vs fp32: {acc}")
        return check.quality(acc)

    tried: list[list[str]] = []
    for what, keep, under in ladder:
        best = max((st["quality"] for st in steps), default=-math.inf)
        if best >= under or keep in tried:
            continue
        if steps:
            log.say(f"int8 quality {best} is under the {'target' if under == target else 'floor'} {under}: again "
                    f"with the {what} kept fp32")
        steps.append({"kept_fp32": what, "quality": build(what, keep)})
        tried.append(keep)
    over = [i for i, st in enumerate(steps) if st["quality"] >= min_cos]
    if not over:
        for f in [i8, *(tmp / e for e in extra)]:
            f.unlink(missing_ok=True)
        raise ExportError(
            f"int8 agreement with fp32 (mean dense cosine, or score Pearson for rerankers) is "
            f"{max(st['quality'] for st in steps)} at best on the calibration set ({steps}), under the threshold "
            f"{min_cos}; refusing to write it. Export fp32 instead, or pass --min-int8-cosine 0 if the weights "
            f"are random (benchmarks).")
    chosen = max(over, key=lambda i: steps[i]["quality"])  # the first that met the target, else the best over the floor
    if chosen != len(steps) - 1:  # a later step scored lower: write the chosen graph again
        log.say(f"keeping the graph with {steps[chosen]['kept_fp32']} kept fp32: the best over the floor")
        build(steps[chosen]["kept_fp32"], tried[chosen])
    quant = {**quant, **({} if dynamic else {"quality_target": target}), "steps": steps,
             "chosen": steps[chosen]["kept_fp32"]}
    with log.step("measuring int8 batch dependence (each text alone vs in padded batches of 8)"):
        dep = check.parity(check.run_graph(i8, ids, pad, batch=1), batched)
    log.say(f"int8 batch dependence (max abs): {dep}")
    quant = {**quant, "batch_dependence_max_abs": dep}
    entry = GraphEntry(file=i8.name, format="onnx", precision="int8", opset=graph.OPSET,
                       cpu_target="any x86-64/arm64; fastest with AVX512-VNNI/AVX-VNNI/ARM dotprod",
                       external_data=tuple(extra), fused=True, quantization=quant,
                       accuracy={"reference": "onnx fp32 graph", "n_texts": len(ids), **acc,
                                 "threshold_dense_cosine_mean": min_cos})
    return entry, extra


def _with_linear_attention(src: SourceModel, tmp: Path, entry: GraphEntry, ids: list[list[int]], pad: int,
                           got32: list[list[Any]], min_cos: float, log: _Progress) -> GraphEntry:
    """Add the flash-attention branch for unpadded inputs (see longattn.py) to a graph, and check it.

    Done last, on the plain graphs: int8 is quantised from the plain fp32 graph (its MultiHeadAttention nodes get
    the branch) and fp16 stays plain (CUDA's own Attention is memory-efficient).
    """
    path = tmp / entry.file
    with log.step(f"adding the linear-memory attention path to the {entry.precision} graph"):
        n = graph.add_linear_attention_to(path, src.hidden_size)
    singles = check.run_graph(path, ids, pad, batch=1)  # one text, no padding: the flash branch
    if entry.precision == "fp32":
        par = check.parity(got32, singles)
        log.say(f"fp32 flash branch parity ({n} layers): {par}")
        if max(par.values()) > check.PARITY_TOLERANCE:
            raise ExportError(f"the flash-attention branch differs from the fp32 graph by {max(par.values()):.2e} "
                              f"(> {check.PARITY_TOLERANCE:.0e}); refusing to write it. Please report this.")
        acc = {**entry.accuracy, "flash_branch": par}
    else:
        agr = check.agreement(got32, singles)
        log.say(f"int8 flash branch vs fp32 ({n} layers): {agr}")
        if check.quality(agr) < min_cos:
            raise ExportError(f"the int8 flash-attention branch agrees with fp32 at {check.quality(agr)} (mean dense "
                              f"cosine, or score Pearson for rerankers), under the threshold {min_cos}; refusing "
                              f"to write it.")
        acc = {**entry.accuracy, "flash_branch": agr}
    return dataclasses.replace(entry, linear_attention=True, accuracy=acc)


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise: GBs for BGE-M3)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl and other libcs: nothing to trim
            pass


def _finalize(tmp: Path, out: Path, replace: tuple[int, int] | None) -> None:
    """Move the finished folder into place without ever replacing a folder that appeared meanwhile.

    ``replace`` is the (device, inode) of the artifact that --force checked at the start: only that very
    folder is moved aside (and deleted once the new one is in place). Anything else now at ``out``, or
    anything at all when there was nothing to replace, is left alone and the export fails.
    """
    appeared = (f"--out {out} appeared while exporting (another export or program wrote it); it was left "
                f"untouched and this export was discarded. Export again to another --out, or remove {out} first.")
    old = out.parent / f"{_TMP_PREFIX}{_OLD}{out.name}-{os.getpid()}"
    if replace is not None:
        try:
            os.rename(out, old)
        except FileNotFoundError:
            replace = None  # it went away meanwhile: nothing to replace
        else:
            try:  # the same folder (inodes get reused: check what it holds too), still only an artifact
                same = _artifact_identity(old) == replace
            except ExportError:
                same = False
            if not same:  # not the artifact checked at the start: put it back
                _rename_noreplace(old, out)
                raise ExportError(appeared)
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        if replace is not None:
            _rename_noreplace(old, out)
        raise ExportError(appeared) from None
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        if replace is not None:
            _rename_noreplace(old, out)
        raise ExportError(appeared) from None
    if replace is not None:
        shutil.rmtree(old, ignore_errors=True)
