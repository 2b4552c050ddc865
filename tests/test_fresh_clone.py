"""A clone works anywhere: the committed tree alone (``git archive HEAD`` in an empty folder, nothing beside it, no
network to a model hub) runs the demo, and every command of README's "Use", "Serve", "Rerankers" and "Air-gapped
bundle" sections runs as written on the artifacts the demo leaves."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("Use", "Serve", "Rerankers", "Air-gapped bundle")


def readme_blocks(readme: Path) -> list[tuple[str, str, str]]:
    """(section, language, code) of every ```bash / ```python block in the README sections users copy from."""
    out, section = [], None
    for part in re.split(r"^(## .+)$", readme.read_text(encoding="utf-8"), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
        elif section in SECTIONS:
            out += [(section, lang, code) for lang, code in re.findall(r"```(bash|python)\n(.*?)```", part, re.S)]
    return out


BLOCKS = readme_blocks(REPO / "README.md")


def _tracked_files() -> list[Path]:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout: the fresh-clone tests copy the committed tree with git archive")
    return [REPO / f for f in r.stdout.decode().split("\0") if f]


def test_no_file_reads_data_from_outside_the_repository() -> None:
    needles = ["../" + "shared", "BGE_EDGE_" + "SHARED", "/work/" + "shared", "parents[2] / " + '"shared"']
    hits = [f"{f.relative_to(REPO)}: {n}" for f in _tracked_files() if f.is_file() and f.suffix != ".gz"
            for n in needles if n in f.read_text(encoding="utf-8", errors="replace")]
    assert hits == []


@dataclass(frozen=True)
class Clone:
    root: Path
    python: Path
    env: dict[str, str]

    def run(self, args: list[str] | str, timeout: float, shell: bool = False) -> subprocess.CompletedProcess[str]:
        """Run in the clone's root with its venv first on PATH; kill the whole process group on timeout."""
        cmd = ["bash", "-e", "-o", "pipefail", "-c", args] if shell else args
        p = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"timed out after {timeout} s: {args}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}")
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # a server a block left running
            except ProcessLookupError:
                pass
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    """The committed tree in an empty folder, with a venv whose only bge-edge is that tree (editable install; the
    other packages come from this test run's environment, added as a plain path, so nothing is downloaded)."""
    _tracked_files()
    root = tmp_path_factory.mktemp("fresh") / "bge-edge"
    tar = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(root, filter="data")
    assert not any((p / "shared").exists() for p in root.parents), "a shared/ folder above the clone"
    venv = root / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "outer-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e",
                        str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", BGE_EDGE_CACHE_DIR=str(root.parent / "hash-cache"))
    c = Clone(root, python, env)
    where = c.run([str(python), "-c", "import bge_edge.runtime, bench.demo; print(bge_edge.runtime.__file__, "
                                      "bench.demo.__file__)"], timeout=60)
    assert where.returncode == 0 and where.stdout.split() == [str(root / "runtime" / "__init__.py"),
                                                              str(root / "bench" / "demo.py")], where
    return c


@pytest.fixture(scope="module")
def demo(clone: Clone) -> subprocess.CompletedProcess[str]:
    return clone.run([str(clone.python), "-m", "bench.demo", "--quick"], timeout=1200)


@pytest.mark.slow
def test_demo_runs_in_a_bare_clone_offline(clone: Clone, demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = demo.stdout
    m = re.search(r"nDCG@10 over the (\d+) queries whose relevant documents are among these 300: ([\d.]+)", out)
    assert m and int(m.group(1)) > 10 and 40 < float(m.group(2)) <= 100, out
    assert "documents are longer than the 256 tokens this model reads" in out
    assert "random weights" in out and re.search(r"done in [\d.]+ s", out)
    assert "\n\n" not in out, "stray blank lines"
    assert re.search(r"reranked 10 passages with tiny-bge-reranker-v2-m3", out)
    for art in ("dense", "bge-m3", "reranker"):
        assert (clone.root / "artifacts" / art / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("section,lang,code", BLOCKS, ids=[f"{s}-{k}-{lang}" for k, (s, lang, _) in enumerate(BLOCKS)])
def test_readme_block_runs_as_written(clone: Clone, demo: subprocess.CompletedProcess[str], section: str, lang: str,
                                      code: str) -> None:
    assert demo.returncode == 0, "the demo failed; see test_demo_runs_in_a_bare_clone_offline"
    if lang == "bash":
        r = clone.run(code, timeout=600, shell=True)
    else:
        r = clone.run([str(clone.python), "-c", code], timeout=300)
    assert r.returncode == 0, f"{section} block failed:\n{code}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"


def test_readme_sections_have_blocks_to_run() -> None:
    assert {s for s, _, _ in BLOCKS} == set(SECTIONS)
    assert sum(1 for _, lang, _ in BLOCKS if lang == "python") >= 2  # M3 and a dense model


@pytest.mark.slow
def test_readme_lists_exactly_what_the_runtime_install_pulls_in() -> None:
    from bench.footprint import resolve_runtime

    text = (REPO / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"<!-- runtime-dists -->(.*?)<!-- /runtime-dists -->", text, re.S)
    assert listed, "README lost its runtime distribution list"
    names = sorted(re.findall(r"[a-z][a-z0-9-]+", listed.group(1).replace("and what they pull in", "")))
    assert names == resolve_runtime(), "README's runtime list is stale: run python -m bench.footprint and update it"
