"""Real retrieval with the real all-MiniLM-L6-v2 on SciFact (MTEB protocol): FP32 reproduces the
published MTEB score, INT8 loses at most 0.2 of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.retrieval import load_task

MTEB_SCIFACT_MINILM_L6 = 64.51  # published MTEB nDCG@10 of sentence-transformers/all-MiniLM-L6-v2 on SciFact


@pytest.mark.slow
def test_scifact_ndcg_reproduces_mteb_and_int8_loses_at_most_a_fifth_of_a_point(
        minilm_artifact: Path, scifact_dir: Path, scifact_ndcg) -> None:  # type: ignore[no-untyped-def]
    task = load_task(scifact_dir)
    assert len(task.docs) == 5183 and len(task.queries) == 300
    scores = {p: scifact_ndcg(minilm_artifact, "onnxruntime", p) for p in ("fp32", "int8")}
    print(f"SciFact nDCG@10: fp32 {scores['fp32']:.2f}, int8 {scores['int8']:.2f} (MTEB {MTEB_SCIFACT_MINILM_L6})")
    assert abs(scores["fp32"] - MTEB_SCIFACT_MINILM_L6) <= 0.5
    # measured on an AVX2 host: fp32 64.51, int8 64.98 (per-token INT8 with the V projections fp32; all-INT8 64.85,
    # the previous dynamic INT8 64.60): INT8 above FP32 is noise, but the upper bound is only 0.03 away
    assert scores["fp32"] - 0.2 <= scores["int8"] <= scores["fp32"] + 0.5


def test_evaluation_data_ships_with_the_repo_and_a_changed_file_fails_loudly(tmp_path: Path) -> None:
    import shutil

    from bench.retrieval import SCIFACT, XQUAD_EN, checked

    repo = Path(__file__).resolve().parents[1]
    for folder in (SCIFACT, XQUAD_EN):
        assert folder.resolve().is_relative_to(repo) and checked(folder) == folder
    copy = tmp_path / "scifact"
    shutil.copytree(SCIFACT, copy)
    with open(copy / "qrels.tsv", "a") as f:
        f.write("extra\tline\t1\n")
    with pytest.raises(ValueError, match=r"qrels.tsv: SHA-256 [0-9a-f]{64} != [0-9a-f]{64}.*git checkout"):
        load_task(copy)
