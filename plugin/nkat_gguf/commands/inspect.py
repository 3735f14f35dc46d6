"""nkat inspect: the metadata and per-tensor ranks/types of a .nkat file."""

from __future__ import annotations

from ..formats.nkat_format import read_layout
from ..util.report import human_bytes, print_json, print_table
from .common import add_output_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a .nkat file's metadata and tensors",
                              description="Show the nkat.* metadata and each tensor's rank and storage type.")
    p.add_argument("file", help="a .nkat file")
    add_output_flags(p)
    p.set_defaults(func=run)


def tensor_rows(pairs: dict) -> list[dict]:
    return [{
        "tensor": name,
        "rank": int(a.shape[1]),
        "n_in": int(a.shape[0]),
        "n_out": int(b.shape[1]),
        "lora_a": a.tensor_type.name,
        "lora_b": b.tensor_type.name,
        "bytes": int(a.n_bytes + b.n_bytes),
    } for name, (a, b) in pairs.items()]


def run(args) -> int:
    meta, pairs = read_layout(args.file)
    rows = tensor_rows(pairs)
    if args.json:
        print_json({"file": args.file, "meta": meta.as_dict(), "tensors": rows})
        return 0
    print_table(f"{args.file}", ["key", "value"], sorted((k, str(v)) for k, v in meta.as_dict().items()))
    print_table("tensors", ["tensor", "rank", "n_in", "n_out", "lora_a", "lora_b", "bytes"],
                [[r[k] for k in ("tensor", "rank", "n_in", "n_out", "lora_a", "lora_b")] + [human_bytes(r["bytes"])]
                 for r in rows])
    return 0
