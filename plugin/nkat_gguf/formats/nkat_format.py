"""The .nkat file: a standard GGUF LoRA adapter plus nkat.* metadata. The one schema.

llama.cpp applies `scale * B @ (A @ x)` with scale = user_scale * alpha / rank_t, where rank_t is
lora_b's ne[0]. We store B_stored = rank_t * B and alpha = 0.5 * gamma, so a stock loader at
user scale 1 applies exactly 0.5 * gamma * theta_t for every tensor, whatever its rank, and a
run-time gamma g is user scale g / gamma.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from ..util.atomic import atomic_path
from ..errors import UserError
from .gguf_io import field_contents, field_value, open_gguf

NKAT_VERSION = 1
THETA_TYPES = ("q8_0", "f16", "f32")
Q8_0_BLOCK = 32
F16_MAX = 65504.0


@dataclass
class ThetaFactors:
    """theta = B @ A for one weight matrix: A (rank, n_in), B (n_out, rank), float32."""

    name: str
    A: np.ndarray
    B: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def theta(self) -> np.ndarray:
        return self.B @ self.A


@dataclass
class NkatMeta:
    theta_rank: int
    theta_gamma: float
    source: str
    structure: str
    theta_type: str
    base: dict
    reference: dict | None = None
    imatrix: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class NkatFile:
    path: Path
    meta: dict  # every nkat.* key without the prefix, plus alpha and architecture
    factors: dict[str, ThetaFactors]
    tensor_types: dict[str, tuple[str, str]]  # name -> (lora_a type, lora_b type)

    @property
    def gamma(self) -> float:
        return float(self.meta["theta_gamma"])

    @property
    def theta_bytes(self) -> int:
        return int(self.meta["theta_bytes"])


def storage_type(theta_type: str, row_length: int) -> GGMLQuantizationType:
    """Q8_0 needs rows that are a multiple of 32; F16 stands in otherwise (recorded per tensor)."""
    if theta_type == "q8_0":
        if row_length % Q8_0_BLOCK == 0:
            return GGMLQuantizationType.Q8_0
        return GGMLQuantizationType.F16
    if theta_type == "f16":
        return GGMLQuantizationType.F16
    if theta_type == "f32":
        return GGMLQuantizationType.F32
    raise UserError(f"--theta-type must be one of {', '.join(THETA_TYPES)}, not {theta_type!r}")


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return array
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quantize(array, qtype)


def stored_roundtrip(array: np.ndarray, theta_type: str) -> np.ndarray:
    """What a factor (rows, row_length) reads back as after storage in theta_type, float32."""
    qtype = storage_type(theta_type, array.shape[1])
    return np.asarray(dequantize(encode(array, qtype), qtype), np.float32).reshape(array.shape)


def check_storable(name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> None:
    """Refuse factors that are not finite or would overflow their storage type (F16 and the
    F16 scales of Q8_0): a theta must never be written as Inf."""
    limit = {GGMLQuantizationType.F16: F16_MAX, GGMLQuantizationType.Q8_0: F16_MAX * 127}.get(qtype, np.inf)
    peak = float(np.abs(array).max()) if array.size else 0.0
    if not np.isfinite(peak) or peak >= limit:
        raise UserError(f"{name}: theta factors reach {peak:.3g}, beyond what {qtype.name} stores "
                        "(the model's weights are out of range: a damaged file?)")


def stored_bytes(shape: tuple[int, int], qtype: GGMLQuantizationType) -> int:
    rows, cols = shape
    if qtype == GGMLQuantizationType.Q8_0:
        return rows * (cols // Q8_0_BLOCK) * 34
    return rows * cols * (2 if qtype == GGMLQuantizationType.F16 else 4)


def factor_bytes(n_out: int, n_in: int, rank: int, theta_type: str) -> int:
    """Bytes that one matrix's factors take in the file at this rank."""
    a = stored_bytes((rank, n_in), storage_type(theta_type, n_in))
    b = stored_bytes((n_out, rank), storage_type(theta_type, rank))
    return a + b


def write_nkat(path: str | os.PathLike, architecture: str, factors: list[ThetaFactors], meta: NkatMeta) -> int:
    """Write the adapter atomically; returns the bytes of theta (tensor data only)."""
    if meta.theta_gamma == 0 or not np.isfinite(meta.theta_gamma):
        # alpha = 0 means "no alpha" to llama.cpp, which would apply rank * theta.
        raise UserError(
            f"--theta-gamma must be finite and non-zero (got {meta.theta_gamma}); "
            "to switch theta off use --gamma 0 at run time"
        )
    encoded = []
    theta_bytes = 0
    for f in factors:
        a_type = storage_type(meta.theta_type, f.A.shape[1])
        b_type = storage_type(meta.theta_type, f.rank)
        with np.errstate(over="ignore"):
            b_stored = f.B * np.float32(f.rank)
        check_storable(f.name, f.A, a_type)
        check_storable(f.name, b_stored, b_type)
        a_data = encode(f.A, a_type)
        b_data = encode(b_stored, b_type)
        theta_bytes += a_data.nbytes + b_data.nbytes
        encoded.append((f, a_type, a_data, b_type, b_data))

    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), architecture)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 0.5 * float(meta.theta_gamma))
        writer.add_uint32("nkat.version", NKAT_VERSION)
        writer.add_uint32("nkat.theta_rank", int(meta.theta_rank))
        writer.add_float32("nkat.theta_gamma", float(meta.theta_gamma))
        writer.add_string("nkat.source", meta.source)
        writer.add_string("nkat.structure", meta.structure)
        writer.add_string("nkat.theta_type", meta.theta_type)
        writer.add_uint32("nkat.tensor_count", len(factors))
        writer.add_uint64("nkat.theta_bytes", theta_bytes)
        writer.add_string("nkat.imatrix", meta.imatrix)
        for prefix, identity in (("base", meta.base), ("reference", meta.reference or {})):
            writer.add_string(f"nkat.{prefix}.name", str(identity.get("name", "")))
            writer.add_string(f"nkat.{prefix}.architecture", str(identity.get("architecture", "")))
            writer.add_uint64(f"nkat.{prefix}.file_size", int(identity.get("file_size", 0)))
            writer.add_string(f"nkat.{prefix}.fingerprint", str(identity.get("fingerprint", "")))
            writer.add_string(f"nkat.{prefix}.path", str(identity.get("path", "")))
        for key, value in meta.extra.items():
            writer.add_string(f"nkat.{key}", str(value))
        for f, a_type, a_data, b_type, b_data in encoded:
            writer.add_tensor(f"{f.name}.lora_a", a_data, raw_dtype=a_type if a_type != GGMLQuantizationType.F32 else None)
            writer.add_tensor(f"{f.name}.lora_b", b_data, raw_dtype=b_type if b_type != GGMLQuantizationType.F32 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return theta_bytes


def read_meta(path: str | os.PathLike) -> dict:
    """The nkat.* metadata (prefix dropped) plus alpha and architecture; no tensor data read."""
    return _meta_from_reader(open_gguf(path), Path(path))


def _meta_from_reader(reader, path: Path) -> dict:
    if field_value(reader, "general.type") != "adapter" or field_value(reader, "adapter.type") != "lora":
        raise UserError(f"{path}: not a LoRA adapter (.nkat files are GGUF LoRA adapters)")
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("nkat."):
            meta[key[len("nkat."):]] = field_contents(fld, path)
    if "version" not in meta:
        raise UserError(f"{path}: a LoRA adapter without nkat.* metadata (not made by nkat convert)")
    meta["alpha"] = float(field_value(reader, "adapter.lora.alpha", 0.0))
    meta["architecture"] = str(field_value(reader, "general.architecture", ""))
    return meta


def lora_pairs(reader, path) -> dict:
    """weight name -> (lora_a, lora_b) reader tensors, every pair complete and rank-consistent."""
    halves: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        base, _, half = t.name.rpartition(".")
        if half not in ("lora_a", "lora_b"):
            raise UserError(f"{path}: unexpected tensor {t.name}")
        halves.setdefault(base, {})[half] = t
    pairs = {}
    for name, pair in halves.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise UserError(f"{path}: {name} lacks its lora_a or lora_b half")
        ta, tb = pair["lora_a"], pair["lora_b"]
        if int(ta.shape[1]) != int(tb.shape[0]):
            raise UserError(f"{path}: {name} has lora_a rank {int(ta.shape[1])} but lora_b rank {int(tb.shape[0])}")
        pairs[name] = (ta, tb)
    return pairs


def read_layout(path: str | os.PathLike) -> tuple[dict, dict]:
    """(metadata, lora pairs) from one read of the file, without dequantizing anything."""
    reader = open_gguf(path)
    return _meta_from_reader(reader, Path(path)), lora_pairs(reader, path)


def read_nkat(path: str | os.PathLike) -> NkatFile:
    """Read the adapter back into float32 factors with theta = B @ A (rank scaling undone)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = _meta_from_reader(reader, path)
    factors, types = {}, {}
    for name, (ta, tb) in lora_pairs(reader, path).items():
        A = np.asarray(dequantize(ta.data, ta.tensor_type), np.float32).reshape(int(ta.shape[1]), int(ta.shape[0]))
        B = np.asarray(dequantize(tb.data, tb.tensor_type), np.float32).reshape(int(tb.shape[1]), int(tb.shape[0]))
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise UserError(f"{path}: {name} has NaN or Inf in its theta factors")
        factors[name] = ThetaFactors(name, A, B / np.float32(A.shape[0]))
        types[name] = (ta.tensor_type.name, tb.tensor_type.name)
    return NkatFile(path, meta, factors, types)


def check_fits_model(pairs: dict, model_tensors: dict, theta_path) -> None:
    """Refuse theta for weights the model does not have, or of another shape (both backends,
    before llama.cpp loads anything). `pairs` from lora_pairs, `model_tensors` name -> gguf-py
    tensor of the model."""
    missing = [name for name in pairs if name not in model_tensors]
    if missing:
        raise UserError(f"{theta_path}: {len(missing)} of its {len(pairs)} theta tensors match no weight of the "
                        f"model (first: {missing[0]}); it was made for another model")
    for name, (ta, tb) in pairs.items():
        n_in, n_out = (int(x) for x in model_tensors[name].shape[:2])
        if int(ta.shape[0]) != n_in or int(tb.shape[1]) != n_out:
            raise UserError(f"{theta_path}: {name} is {int(tb.shape[1])} x {int(ta.shape[0])} in theta, "
                            f"{n_out} x {n_in} in the model; it was made for another model")


def check_base_matches(meta: dict, model_identity: dict, theta_path) -> None:
    """Refuse a theta made for another model (architecture and content fingerprint)."""
    arch = meta.get("base.architecture") or meta.get("architecture")
    if arch and arch != model_identity["architecture"]:
        raise UserError(
            f"{theta_path}: made for architecture {arch}, but the model is {model_identity['architecture']}"
        )
    fp = meta.get("base.fingerprint")
    if fp and fp != model_identity["fingerprint"]:
        raise UserError(
            f"{theta_path}: made for base model {meta.get('base.name')!r} "
            f"(fingerprint {fp[:12]}), not {model_identity['path']} (fingerprint {model_identity['fingerprint'][:12]})"
        )


def is_nkat_path(value: str | os.PathLike | None) -> bool:
    """A --model value that names a .nkat adapter rather than a model."""
    return bool(value) and Path(value).suffix.lower() == ".nkat"


def _same_base(meta: dict, candidate: Path) -> bool:
    from .gguf_io import fingerprint_file

    size = int(meta.get("base.file_size") or 0)
    if size and candidate.stat().st_size != size:
        return False
    recorded = meta.get("base.fingerprint")
    return not recorded or fingerprint_file(candidate) == recorded


def find_base_model(theta: str | os.PathLike, base: str | os.PathLike | None = None,
                    models_dir: str | os.PathLike | None = None) -> Path:
    """The base model a .nkat corrects, checked by fingerprint.

    Looked for in this order: `base` when given; the path recorded in the .nkat; a file of that
    name, or any GGUF of the recorded size and fingerprint, in the .nkat's directory and then in
    `models_dir`. The one place that turns an adapter into its base model.
    """
    from .gguf_io import fingerprint_file

    theta = Path(theta)
    if not theta.is_file():
        raise UserError(f"{theta}: no such .nkat file")
    meta = read_meta(theta)
    if base:
        base = Path(base)
        if not base.is_file():
            raise UserError(f"base model not found: {base}")
        if meta.get("base.fingerprint"):  # same content fingerprint = same model
            identity = {"architecture": meta.get("base.architecture") or meta.get("architecture"),
                        "fingerprint": fingerprint_file(base), "path": str(base)}
        else:  # only then the architecture is worth parsing the whole GGUF header for
            from .gguf_io import ModelFile

            identity = ModelFile(base).identity()
        check_base_matches(meta, identity, theta)
        return base
    recorded = Path(str(meta.get("base.path") or ""))
    candidates = [recorded] if recorded.name else []
    for directory in [theta.parent] + ([Path(models_dir)] if models_dir else []):
        if not directory.is_dir():
            continue
        if recorded.name:
            candidates.append(directory / recorded.name)
        candidates += sorted(p for p in directory.glob("*.gguf") if p.name != recorded.name)
    for candidate in candidates:
        if candidate.is_file() and _same_base(meta, candidate):
            return candidate
    where = ", ".join([str(theta.parent)] + ([str(models_dir)] if models_dir else []))
    changed = " (a file with another fingerprint is there)" if recorded.name and recorded.is_file() else ""
    raise UserError(f"{theta}: base model not found: {recorded or 'no path recorded'}{changed}, nor a GGUF with "
                    f"its fingerprint in {where}: pass --model BASE.gguf with --theta, or --models-dir DIR")


def split_model_argument(model: str | os.PathLike, thetas: list | None = None,
                         models_dir: str | os.PathLike | None = None) -> tuple[str, list[str]]:
    """--model X.nkat -> (its base model, [X.nkat] + thetas); a model path is returned as is."""
    thetas = [str(t) for t in (thetas or [])]
    if not is_nkat_path(model):
        return str(model), thetas
    return str(find_base_model(model, None, models_dir)), [str(model)] + thetas
