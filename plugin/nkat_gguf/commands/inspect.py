"""nkat inspect: the metadata and per-tensor ranks/types of a .nkat file."""

from __future__ import annotations

from gguf import GGUFReader  # noqa: F401  (gguf-py does the reading)

from ..gguf_io import open_gguf
from ..nkat_format import read_meta
from ..report import human_bytes, print_json, print_table
from .common import add_output_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a .nkat file's metadata and tensors",
                              description="Show the nkat.* metadata and each tensor's rank and storage type.")
    p.add_argument("file", help="a .nkat file")
    add_output_flags(p)
    p.set_defaults(func=run)


def tensor_rows(path) -> list[dict]:
    reader = open_gguf(path)
    halves = {}
    for t in reader.tensors:
        base, _, half = t.name.rpartition(".")
        halves.setdefault(base, {})[half] = t
    rows = []
    for name, pair in halves.items():
        a, b = pair.get("lora_a"), pair.get("lora_b")
        rows.append({
            "tensor": name,
            "rank": int(a.shape[1]) if a is not None else None,
            "n_in": int(a.shape[0]) if a is not None else None,
            "n_out": int(b.shape[1]) if b is not None else None,
            "lora_a": a.tensor_type.name if a is not None else None,
            "lora_b": b.tensor_type.name if b is not None else None,
            "bytes": int((a.n_bytes if a is not None else 0) + (b.n_bytes if b is not None else 0)),
        })
    return rows


def run(args) -> int:
    meta = read_meta(args.file)
    rows = tensor_rows(args.file)
    if args.json:
        print_json({"file": args.file, "meta": meta, "tensors": rows})
        return 0
    print_table(f"{args.file}", ["key", "value"], sorted((k, str(v)) for k, v in meta.items()))
    print_table("tensors", ["tensor", "rank", "n_in", "n_out", "lora_a", "lora_b", "bytes"],
                [[r[k] for k in ("tensor", "rank", "n_in", "n_out", "lora_a", "lora_b")] + [human_bytes(r["bytes"])]
                 for r in rows])
    return 0
