"""`oss-mlx models`: what the model store holds (model_store.py has the rule every entry point uses).

oss-mlx models                          list: hub id, where, size, path
oss-mlx models path openai/gpt-oss-20b  the folder every entry point loads for that id
oss-mlx models remove openai/gpt-oss-20b [--yes]
"""

from __future__ import annotations

import argparse
import sys

from . import model_store as S

ACTIONS = ("list", "path", "remove")


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as A

    ap = A.parser(
        "oss-mlx models",
        "The models on this machine that a hub id resolves to: the converted copies in the store "
        f"({S.store_dir()}), then gpt-oss snapshots in the Hugging Face cache (used as they are).\n\n"
        "  oss-mlx models                   list them: hub id, size, where, path\n"
        "  oss-mlx models path ID           the folder every entry point loads for ID\n"
        "  oss-mlx models remove ID [--yes] delete the store's copy of ID (asks first)",
    )
    ap.add_argument(
        "action", nargs="?", choices=ACTIONS, default="list", metavar="ACTION", help=", ".join(ACTIONS)
    )
    ap.add_argument(
        "repo_id", nargs="?", type=A.hub_id, metavar="ID", help="hub repo id, e.g. openai/gpt-oss-20b"
    )
    ap.add_argument("-y", "--yes", action="store_true", help="remove without asking")
    return ap


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def list_models() -> int:
    for removed in S.clean_unfinished():
        print(f"removed an unfinished conversion: {removed}", file=sys.stderr)
    models = S.stored_models()
    in_store = {m.repo_id for m in models}
    models += [m for m in S.cached_models() if m.repo_id not in in_store]
    if not models:
        print(f"no models yet (converted models go to {S.store_dir()}; `oss-mlx chat` fetches one)")
    width = max((len(m.repo_id) for m in models), default=0)
    for m in models:
        where = f"store, {m.preset}" if m.where == "store" and m.preset else m.where
        print(f"{m.repo_id:<{width}}  {_size(m.bytes):>10}  {where:<17}  {m.path}")
        if m.damage is not None:
            print(f"{'':<{width}}  damaged, not used: {m.damage} (oss-mlx models remove {m.repo_id})")
    for folder, alive in S.unfinished():
        what = "conversion running" if alive else "download, resumes on next use"
        print(f"{'(unfinished)':<{width}}  {_size(S.folder_bytes(folder)):>10}  {what}: {folder}")
    return 0


def show_path(repo_id: str) -> int:
    S.entry_name(repo_id)  # a bad id is said as such
    found = S.converted(repo_id)
    problem = None if found is None else S.damage(found)
    if problem is not None:
        print(
            f"oss-mlx models: the store's copy of {repo_id} ({found}) is damaged: {problem}. "
            f"Remove it (oss-mlx models remove {repo_id}); the next use converts it again.",
            file=sys.stderr,
        )
        return 1
    found = found or S.hub_cached(repo_id)
    if found is None:
        print(
            f"oss-mlx models: {repo_id} is not on this machine; its first use converts it into "
            f"{S.converted_folder(repo_id)}",
            file=sys.stderr,
        )
        return 1
    print(found)
    return 0


def remove(repo_id: str, yes: bool) -> int:
    paths = S.removable(repo_id)
    if not paths:
        cached = S.hub_cached(repo_id)
        where = (
            f"; it is in the Hugging Face cache ({cached}), which this command does not touch "
            "(`hf cache delete` removes it there)"
            if cached
            else ""
        )
        print(f"oss-mlx models: the store holds nothing of {repo_id}{where}", file=sys.stderr)
        return 1
    total = sum(S.folder_bytes(p) for p in paths)
    listing = "\n".join(f"  {p}" for p in paths)
    if not yes:
        if not sys.stdin.isatty():
            print(
                f"oss-mlx models: error: removing {repo_id} ({_size(total)}) needs a confirmation: "
                "pass --yes",
                file=sys.stderr,
            )
            return 2
        try:
            answer = input(f"remove {repo_id} ({_size(total)}):\n{listing}\n? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            print("nothing removed")
            return 1
    for path in S.remove(repo_id):
        print(f"removed {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.action in ("path", "remove") and args.repo_id is None:
        ap.error(f"{args.action} needs a hub repo id (e.g. oss-mlx models {args.action} openai/gpt-oss-20b)")
    if args.action == "list" and args.repo_id is not None:
        ap.error(f"list takes no ID (oss-mlx models path {args.repo_id} prints its folder)")
    if args.yes and args.action != "remove":
        ap.error("--yes applies to remove")
    if args.action == "path":
        return show_path(args.repo_id)
    if args.action == "remove":
        return remove(args.repo_id, args.yes)
    return list_models()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
