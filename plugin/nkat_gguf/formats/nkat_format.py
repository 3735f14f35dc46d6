"""The .nkat file: a standard GGUF LoRA adapter plus nkat.* metadata. The one schema.

llama.cpp applies `scale * B @ (A @ x)` with scale = user_scale * alpha / rank_t, where rank_t is
lora_b's ne[0]. We store B_stored = rank_t * B and alpha = applied_scale(gamma) = 0.5 * gamma, so
a stock loader at user scale 1 applies exactly 0.5 * gamma * theta_t for every tensor, whatever
its rank, and a run-time gamma g is user scale g / gamma.

Keys (formats/keys.py), beside general.type = "adapter", adapter.type = "lora" and
adapter.lora.alpha (f32):
  nkat.version u32, nkat.theta_rank u32, nkat.theta_gamma f32, nkat.source str,
  nkat.structure str, nkat.theta_type str, nkat.tensor_count u32, nkat.theta_bytes u64:
      always present (strings even when empty);
  nkat.imatrix str: only when an imatrix was used;
  nkat.base.{name, architecture, file_size (u64), fingerprint, path}: always;
  nkat.reference.{...}: the same five, only when theta was fitted to a reference;
  nkat.<other> str: NkatMeta.extra (e.g. nkat.optimize.study), values written as strings.
NkatMeta is what write_nkat writes and read_meta reads back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFType, GGUFValueType, Keys
from gguf.quants import dequantize, quantize

from ..errors import BadSetting, Setting, UserError
from .gguf_io import field_contents, field_value, open_gguf, write_gguf
from .identity import ModelIdentity
from .keys import PREFIX, NkatKeys

NKAT_VERSION = 1
THETA_TYPES = ("q8_0", "f16", "f32")
Q8_0_BLOCK = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
F16_MAX = 65504.0
LORA = "lora"  # adapter.type
# theta is applied as THETA_SCALE * gamma * B @ A: by llama.cpp through alpha, by the native
# shim (runtime/native.py passes it the product), by the merge.
THETA_SCALE = 0.5


def applied_scale(gamma: float) -> float:
    """The factor on theta @ x at gamma: the one home of the 0.5 * gamma rule."""
    return THETA_SCALE * float(gamma)


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
    """The nkat.* metadata: what write_nkat writes, what read_meta returns."""

    theta_rank: int
    theta_gamma: float
    source: str
    structure: str
    theta_type: str
    base: ModelIdentity
    reference: ModelIdentity | None = None
    imatrix: str = ""
    extra: dict = field(default_factory=dict)  # key (without "nkat.") -> value, stored as str
    # Recorded by write_nkat from the tensors it writes; read back from the file.
    tensor_count: int = 0
    theta_bytes: int = 0
    version: int = NKAT_VERSION
    # Outside nkat.*, filled by read_meta: general.architecture (write_nkat takes it as an
    # argument) and adapter.lora.alpha (write_nkat writes applied_scale(theta_gamma)).
    architecture: str = ""
    alpha: float | None = None

    def as_dict(self) -> dict:
        """Every key as the file spells it without "nkat." (base.fingerprint, optimize.study, ...),
        plus alpha and architecture: what nkat inspect shows."""
        flat = {key[len(PREFIX):]: value for key, value, _ in _key_values(self)}
        return flat | {"alpha": self.alpha, "architecture": self.architecture}


# (key, NkatMeta attribute, GGUF type) of the scalar keys, in file order
_SCALARS = (
    (NkatKeys.VERSION, "version", GGUFValueType.UINT32),
    (NkatKeys.THETA_RANK, "theta_rank", GGUFValueType.UINT32),
    (NkatKeys.THETA_GAMMA, "theta_gamma", GGUFValueType.FLOAT32),
    (NkatKeys.SOURCE, "source", GGUFValueType.STRING),
    (NkatKeys.STRUCTURE, "structure", GGUFValueType.STRING),
    (NkatKeys.THETA_TYPE, "theta_type", GGUFValueType.STRING),
    (NkatKeys.TENSOR_COUNT, "tensor_count", GGUFValueType.UINT32),
    (NkatKeys.THETA_BYTES, "theta_bytes", GGUFValueType.UINT64),
)
_IDENTITY = (
    (NkatKeys.Identity.NAME, GGUFValueType.STRING),
    (NkatKeys.Identity.ARCHITECTURE, GGUFValueType.STRING),
    (NkatKeys.Identity.FILE_SIZE, GGUFValueType.UINT64),
    (NkatKeys.Identity.FINGERPRINT, GGUFValueType.STRING),
    (NkatKeys.Identity.PATH, GGUFValueType.STRING),
)


def _typed(value, vtype: GGUFValueType):
    """A key's value as NkatMeta holds it (an absent key: "" or 0)."""
    if vtype == GGUFValueType.STRING:
        return "" if value is None else str(value)
    if vtype == GGUFValueType.FLOAT32:
        return float(value or 0.0)
    return int(value or 0)


def _key_values(meta: NkatMeta) -> list[tuple[str, object, GGUFValueType]]:
    """(key, value, type) of every nkat.* key the file holds for meta, in file order."""
    out = [(key, _typed(getattr(meta, attr), vtype), vtype) for key, attr, vtype in _SCALARS]
    if meta.imatrix:
        out.append((NkatKeys.IMATRIX, str(meta.imatrix), GGUFValueType.STRING))
    identities = [(NkatKeys.Identity.BASE, meta.base)]
    if meta.reference is not None:
        identities.append((NkatKeys.Identity.REFERENCE, meta.reference))
    for prefix, identity in identities:
        for name, vtype in _IDENTITY:
            out.append((f"{prefix}.{name}", _typed(getattr(identity, name), vtype), vtype))
    out += [(PREFIX + key, str(value), GGUFValueType.STRING) for key, value in meta.extra.items()]
    return out


def _known_keys() -> set[str]:
    identity_keys = {f"{p}.{n}" for p in (NkatKeys.Identity.BASE, NkatKeys.Identity.REFERENCE) for n, _ in _IDENTITY}
    return {key for key, _, _ in _SCALARS} | {NkatKeys.IMATRIX} | identity_keys


def _identity_from(values: dict, prefix: str) -> ModelIdentity | None:
    """The identity under prefix; None when the file records none (files written before
    nkat.reference was optional hold only nkat.reference.file_size = 0)."""
    got = {name: _typed(values.get(f"{prefix}.{name}"), vtype) for name, vtype in _IDENTITY}
    return ModelIdentity(**got) if any(got.values()) else None


@dataclass
class NkatFile:
    path: Path
    meta: NkatMeta
    factors: dict[str, ThetaFactors]
    tensor_types: dict[str, tuple[str, str]]  # name -> (lora_a type, lora_b type)

    @property
    def gamma(self) -> float:
        return float(self.meta.theta_gamma)

    @property
    def theta_bytes(self) -> int:
        return int(self.meta.theta_bytes)


def storage_type(theta_type: str, row_length: int) -> GGMLQuantizationType:
    """Q8_0 needs rows that are a multiple of its block; F16 stands in otherwise (recorded per tensor)."""
    if theta_type == "q8_0":
        if row_length % Q8_0_BLOCK == 0:
            return GGMLQuantizationType.Q8_0
        return GGMLQuantizationType.F16
    if theta_type == "f16":
        return GGMLQuantizationType.F16
    if theta_type == "f32":
        return GGMLQuantizationType.F32
    raise BadSetting(Setting.THETA_TYPE, f"must be one of {', '.join(THETA_TYPES)}, not {theta_type!r}")


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return array
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quantize(array, qtype)


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
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return rows * (cols // block) * block_bytes


def factor_bytes(n_out: int, n_in: int, rank: int, theta_type: str) -> int:
    """Bytes that one matrix's factors take in the file at this rank."""
    a = stored_bytes((rank, n_in), storage_type(theta_type, n_in))
    b = stored_bytes((n_out, rank), storage_type(theta_type, rank))
    return a + b


def write_nkat(path: str | os.PathLike, architecture: str, factors: list[ThetaFactors], meta: NkatMeta) -> int:
    """Write the adapter atomically; returns the bytes of theta (tensor data only)."""
    if meta.theta_gamma == 0 or not np.isfinite(meta.theta_gamma):
        # alpha = 0 means "no alpha" to llama.cpp, which would apply rank * theta.
        raise BadSetting(Setting.THETA_GAMMA, f"must be finite and non-zero (got {meta.theta_gamma}); "
                                              "to switch theta off use gamma 0 at run time")
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

    written = replace(meta, version=NKAT_VERSION, tensor_count=len(factors), theta_bytes=theta_bytes)
    with write_gguf(path, architecture, GGUFType.ADAPTER) as writer:
        writer.add_string(Keys.Adapter.TYPE, LORA)
        writer.add_float32(Keys.Adapter.LORA_ALPHA, applied_scale(meta.theta_gamma))
        for key, value, vtype in _key_values(written):
            writer.add_key_value(key, value, vtype)  # add_string would drop empty strings
        for f, a_type, a_data, b_type, b_data in encoded:
            writer.add_tensor(f"{f.name}.lora_a", a_data, raw_dtype=a_type if a_type != GGMLQuantizationType.F32 else None)
            writer.add_tensor(f"{f.name}.lora_b", b_data, raw_dtype=b_type if b_type != GGMLQuantizationType.F32 else None)
    return theta_bytes


def read_meta(path: str | os.PathLike) -> NkatMeta:
    """The metadata of a .nkat; no tensor data read."""
    return _meta_from_reader(open_gguf(path, GGUFType.ADAPTER), Path(path))


def _meta_from_reader(reader, path: Path) -> NkatMeta:
    if field_value(reader, Keys.Adapter.TYPE) != LORA:
        raise UserError(f"{path}: not a LoRA adapter (.nkat files are GGUF LoRA adapters)")
    values = {key: field_contents(fld, path) for key, fld in reader.fields.items() if key.startswith(PREFIX)}
    if NkatKeys.VERSION not in values:
        raise UserError(f"{path}: a LoRA adapter without nkat.* metadata (not made by nkat convert)")
    scalars = {attr: _typed(values.get(key), vtype) for key, attr, vtype in _SCALARS}
    known = _known_keys()
    return NkatMeta(
        **scalars,
        base=_identity_from(values, NkatKeys.Identity.BASE) or ModelIdentity("", "", 0, "", ""),
        reference=_identity_from(values, NkatKeys.Identity.REFERENCE),
        imatrix=_typed(values.get(NkatKeys.IMATRIX), GGUFValueType.STRING),
        extra={key[len(PREFIX):]: value for key, value in values.items() if key not in known},
        architecture=str(field_value(reader, Keys.General.ARCHITECTURE, "")),
        alpha=float(field_value(reader, Keys.Adapter.LORA_ALPHA, 0.0)),
    )


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


def read_layout(path: str | os.PathLike) -> tuple[NkatMeta, dict]:
    """(metadata, lora pairs) from one read of the file, without dequantizing anything."""
    reader = open_gguf(path, GGUFType.ADAPTER)
    return _meta_from_reader(reader, Path(path)), lora_pairs(reader, path)


def read_nkat(path: str | os.PathLike) -> NkatFile:
    """Read the adapter back into float32 factors with theta = B @ A (rank scaling undone)."""
    path = Path(path)
    reader = open_gguf(path, GGUFType.ADAPTER)
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


def check_base_matches(meta: NkatMeta, model: ModelIdentity, theta_path) -> None:
    """Refuse a theta made for another model (architecture and content fingerprint)."""
    arch = meta.base.architecture or meta.architecture
    if arch and arch != model.architecture:
        raise UserError(f"{theta_path}: made for architecture {arch}, but the model is {model.architecture}")
    fp = meta.base.fingerprint
    if fp and fp != model.fingerprint:
        raise UserError(
            f"{theta_path}: made for base model {meta.base.name!r} "
            f"(fingerprint {fp[:12]}), not {model.path} (fingerprint {model.fingerprint[:12]})"
        )


def is_nkat_path(value: str | os.PathLike | None) -> bool:
    """A --model value that names a .nkat adapter rather than a model."""
    return bool(value) and Path(value).suffix.lower() == ".nkat"


def _same_base(meta: NkatMeta, candidate: Path) -> bool:
    from .gguf_io import fingerprint_file

    size = meta.base.file_size
    if size and candidate.stat().st_size != size:
        return False
    recorded = meta.base.fingerprint
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
        if meta.base.fingerprint:  # same content fingerprint = same model: only that is compared
            identity = ModelIdentity(name=base.stem, architecture=meta.base.architecture or meta.architecture,
                                     file_size=base.stat().st_size, fingerprint=fingerprint_file(base),
                                     path=str(base))
        else:  # only then the architecture is worth parsing the whole GGUF header for
            from .gguf_io import ModelFile

            identity = ModelFile(base).identity()
        check_base_matches(meta, identity, theta)
        return base
    recorded = Path(meta.base.path)
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
    raise BadSetting(f"{theta}: base model not found: {recorded or 'no path recorded'}{changed}, nor a GGUF with "
                     f"its fingerprint in {where}: pass", Setting.MODEL, "BASE.gguf with", Setting.THETA, ", or",
                     Setting.MODELS_DIR, "DIR")


def split_model_argument(model: str | os.PathLike, thetas: list | None = None,
                         models_dir: str | os.PathLike | None = None) -> tuple[str, list[str]]:
    """--model X.nkat -> (its base model, [X.nkat] + thetas); a model path is returned as is."""
    thetas = [str(t) for t in (thetas or [])]
    if not is_nkat_path(model):
        return str(model), thetas
    return str(find_base_model(model, None, models_dir)), [str(model)] + thetas
