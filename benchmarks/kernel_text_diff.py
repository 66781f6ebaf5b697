"""Compare the text MLX compiles for each kernel (kernel_sources: header and body) in this checkout
with another git revision's, per dialect: which are byte-identical. A refactor of the kernel sources
should leave the CUDA text identical wherever no algorithm changed; then its PTX is too
(benchmarks/compile_cuda_kernels.py --ptx shows that where nvcc is at hand). No GPU needed.

    python benchmarks/kernel_text_diff.py main                 # this working tree against main
    python benchmarks/kernel_text_diff.py main --diff metal    # and the Metal differences, line by line
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("convert", "kernels_shared", "kernels_metal", "kernels_cuda")

# Run in the tree's own interpreter state: either layout of the kernel modules (oss_mlx.kernels.sources,
# or the older oss_mlx.kernel_sources), every dialect, and where the sources were read from.
_DUMP = """
import importlib, importlib.resources, json, sys
try:
    sources = importlib.import_module("oss_mlx.kernels.sources")
except ImportError:
    sources = importlib.import_module("oss_mlx.kernel_sources")
read_from = str(importlib.resources.files("oss_mlx.kernels_cuda"))
json.dump({"read_from": read_from, **{d: sources.kernel_sources(d) for d in ("cuda", "metal")}}, sys.stdout)
"""


def dump(tree: Path) -> dict:
    """kernel_sources of the checkout at `tree`, run uninstalled (its kernel folders linked into the
    package, as benchmarks/device_profile.sh does, so no installed copy answers instead)."""
    for name in FOLDERS:
        link = tree / "oss_mlx" / name
        if (tree / name).is_dir() and not link.exists():
            link.symlink_to(Path("..") / name)
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _DUMP], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr.strip().splitlines()[-1]}")
    result = json.loads(out.stdout)
    if not Path(result["read_from"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: the kernel sources came from {result['read_from']}, outside it")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="a git revision of this repository, e.g. main")
    p.add_argument("--diff", nargs="*", default=[], metavar="DIALECT", help="print these dialects' diffs")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kernel-text-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", a.rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        before = dump(Path(tmp))
    # this working tree, through its own links (made for the comparison where missing)
    after = dump(REPO)
    changed = 0
    for dialect in ("cuda", "metal"):
        old, new = before[dialect], after[dialect]
        same = [n for n in sorted(set(old) & set(new)) if old[n] == new[n]]
        differ = sorted(set(old) & set(new) - set(same))
        print(f"{dialect}: {len(same)} of {len(new)} kernels byte-identical to {a.rev} (header and body)")
        for name in differ:
            parts = [w for w, i in (("header", 0), ("body", 1)) if old[name][i] != new[name][i]]
            print(f"  {name}: {' and '.join(parts)} differ{'s' * (len(parts) == 1)}")
            if dialect in a.diff:
                for i in (0, 1):
                    for line in difflib.unified_diff(
                        old[name][i].splitlines(), new[name][i].splitlines(), lineterm="", n=0
                    ):
                        if not line.startswith(("---", "+++")):
                            print("    " + line)
        for name in sorted(set(old) ^ set(new)):
            print(f"  {name}: only in {'this tree' if name in new else a.rev}")
        changed += len(differ) + len(set(old) ^ set(new))
    return 0 if not changed else 1


if __name__ == "__main__":
    sys.exit(main())
