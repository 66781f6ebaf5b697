"""The docs stay current facts: no lab-notebook names, no links to files that are not there, and
README's Layout section matches the tree (cheap checks, so the rule keeps)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])
# Paths the docs name, by their top folder; a file name has an extension.
EXTENSIONS = "py|md|sh|jsonl|json|log|txt|gpu|h|cuh|cu|metal|toml|yml|yaml"
PATH = re.compile(
    rf"(?<![\w./-])((?:\.github|benchmarks|convert|docs|examples|kernels_cuda|kernels_metal|kernels_shared"
    rf"|oss_mlx|tests)/[\w./-]*\.(?:{EXTENSIONS}))(?![\w-])"
)
NOTEBOOK = [
    (re.compile(r"\b[Ss]ession \d"), "a session number"),
    (re.compile(r"\b[Rr]uns? [A-Z]\b(?!['’])"), "a run letter"),
    (re.compile(r"\b(?:second|first|last) lease\b|\blease series\b"), "a lease"),
]


def tracked() -> set[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return set(out.stdout.split())


def exists(path: str) -> bool:
    """On disk in a clean clone: the package's mapped folders (oss_mlx/convert -> convert) included."""
    path = path.rstrip(".")
    for mapped in ("convert", "kernels_shared", "kernels_metal", "kernels_cuda"):
        if path.startswith(f"oss_mlx/{mapped}/"):
            path = path.removeprefix("oss_mlx/")
    return (REPO / path).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_session_names_or_run_letters(doc):
    text = doc.read_text()
    for pattern, what in NOTEBOOK:
        found = [m.group(0) for m in pattern.finditer(text)]
        assert not found, f"{doc.name} names {what}: {found} (history goes to the git log)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_a_doc_names_exists(doc):
    text = doc.read_text()
    missing = sorted({p for p in PATH.findall(text) if not exists(p)})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    links = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    broken = [link for link in links if not (doc.parent / link).exists()]
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_docs_holds_docs_only():
    """Results are rows of benchmarks/results/*.jsonl, not files in docs/."""
    other = sorted(p.name for p in (REPO / "docs").iterdir() if p.suffix != ".md")
    assert not other, f"docs/ holds non-doc files: {other}"


def test_the_checks_see_what_they_look_for(tmp_path):
    """The patterns catch what they must (so the tests above cannot pass on a blind check)."""
    bad = "Run K (session 7) in docs/bench-h200-2026-11-27.json, see docs/KERNELS.md and [x](nope.md)"
    assert [what for pattern, what in NOTEBOOK if pattern.search(bad)] == ["a session number", "a run letter"]
    assert PATH.findall(bad) == ["docs/bench-h200-2026-11-27.json", "docs/KERNELS.md"]
    assert not exists("docs/bench-h200-2026-11-27.json") and exists("docs/KERNELS.md")
    assert exists("oss_mlx/convert/converter.py")
    fine = "run `oss-mlx convert`; Run the tests; sessions of the server; a Session object"
    assert not any(pattern.search(fine) for pattern, _ in NOTEBOOK)


# ---- README's Layout ---------------------------------------------------------------------------------

NAME = re.compile(r"^[\w.-]+(?:/|\.(?:py|toml))$")


def layout() -> dict[str, str]:
    """{path named in README's Layout block: its description (continuation lines joined)}."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Layout\n+```\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no Layout block"
    entries: dict[str, str] = {}
    parents: list[tuple[int, str]] = []
    last = None
    for line in block.group(1).splitlines():
        indent = len(line) - len(line.lstrip())
        fields = re.split(r"\s{2,}", line.strip())
        names = [f for f in fields if NAME.match(f)]
        if indent >= 20 or not names:  # a description's continuation
            if last is not None:
                entries[last] += " " + line.strip()
            continue
        parents = [(i, p) for i, p in parents if i < indent]
        prefix = parents[-1][1] if parents else ""
        description = " ".join(f for f in fields if not NAME.match(f))
        for name in names:
            last = prefix + name
            entries[last] = description
        if len(names) == 1 and names[0].endswith("/"):
            parents.append((indent, prefix + names[0]))
    return entries


def test_layout_names_only_what_exists():
    entries = layout()
    assert "oss_mlx/model.py" in entries and "oss_mlx/kernels/dispatch.py" in entries  # the parse works
    missing = [p for p in entries if not (REPO / p).exists()]
    assert not missing, f"README's Layout names what is not in the tree: {missing}"


def test_layout_names_every_top_level_folder_and_module():
    entries = layout()
    files = tracked()
    top = {f.split("/")[0] + ("/" if "/" in f else "") for f in files}
    top = {t for t in top if not t.startswith(".") and (t.endswith("/") or t == "pyproject.toml")}
    package = {f.split("/")[1] + ("/" if f.count("/") > 1 else "") for f in files if f.startswith("oss_mlx/")}
    kernels = {f.split("/")[2] for f in files if f.startswith("oss_mlx/kernels/")}
    unnamed = sorted(
        [t for t in top if t not in entries]
        + [f"oss_mlx/{m}" for m in package if f"oss_mlx/{m}" not in entries]
        + [f"oss_mlx/kernels/{m}" for m in kernels if f"oss_mlx/kernels/{m}" not in entries]
    )
    assert not unnamed, f"README's Layout does not name: {unnamed}"
    # The packages described by a list of their modules name every one of them.
    for folder, source in (
        ("oss_mlx/chat/", "oss_mlx/chat"),
        ("oss_mlx/server/", "oss_mlx/server"),
        ("convert/", "convert"),
    ):
        modules = {Path(f).stem for f in files if f.startswith(source + "/") and f.endswith(".py")} - {
            "__init__"
        }
        words = set(re.findall(r"[\w]+", entries[folder]))
        assert modules <= words, f"README's Layout, {folder}: not named {sorted(modules - words)}"


def test_the_package_mapping_covers_the_tree():
    """pyproject's package-dir maps the design card's top-level folders into the package, and every
    package folder under oss_mlx/ is listed (else an installed copy would lack it)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    for folder in ("convert", "kernels_shared", "kernels_metal", "kernels_cuda"):
        assert mapping[f"oss_mlx.{folder}"] == folder and (REPO / folder / "__init__.py").is_file()
    inits = [
        Path(f).parent.parts for f in tracked() if f.startswith("oss_mlx/") and f.endswith("__init__.py")
    ]
    packages = {".".join(parts) for parts in inits}
    assert {"oss_mlx", "oss_mlx.chat", "oss_mlx.server", "oss_mlx.kernels"} <= packages
    assert packages <= set(setuptools["packages"]), sorted(packages - set(setuptools["packages"]))
