"""GGUF files: the one way to open one (open_gguf: magic, damage and general.type checked) and
to write one (write_gguf: under a temporary name, renamed when complete), and ModelFile, which
reads model weights one tensor at a time, dequantized by gguf-py.

The file is memory-mapped; only the tensor asked for is turned into float32, so a 7B model
never sits in memory as float32.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import sys
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGUF_MAGIC as _GGUF_MAGIC_U32, GGUFReader, GGUFType, GGUFValueType, GGUFWriter, GGMLQuantizationType, Keys
from gguf.gguf_writer import WriterState
from gguf.quants import dequantize

from ..errors import BadSetting, Setting, UserError
from ..util.atomic import atomic_path
from ..util.signals import raise_if_terminated
from .identity import ModelIdentity
from .keys import NkatKeys

# Transformer-block weight matrices: blk.N.<anything>.weight, 2-D, not a norm.
_BLOCK_WEIGHT = re.compile(r"^blk\.\d+\.[A-Za-z0-9_.]+\.weight$")
_BLOCK_ID = re.compile(r"^blk\.(\d+)\.")
_FINGERPRINT_SAMPLES = 64
_FINGERPRINT_SAMPLE_BYTES = 64 * 1024
GGUF_MAGIC = _GGUF_MAGIC_U32.to_bytes(4, "little")  # b"GGUF"


def is_target_name(name: str) -> bool:
    """The tensor-name filter: block weight matrices that a LoRA adapter may correct."""
    return bool(_BLOCK_WEIGHT.match(name)) and "_norm" not in name and ".norm" not in name


def fingerprint_file(path: str | os.PathLike) -> str:
    """A content fingerprint that reads a few MiB, not the whole file (7B models are 4+ GB).

    sha256 over the size, the first MiB (header, metadata, tensor index) and 64 evenly spaced
    64 KiB samples of the data: any re-quantization or different weights change it.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        for i in range(_FINGERPRINT_SAMPLES):
            f.seek(size * i // _FINGERPRINT_SAMPLES)
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def read_magic(path: str | os.PathLike, missing: str = "file not found") -> bytes:
    """A file's first 4 bytes (b"GGUF" for a GGUF); one-line error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{missing}: {path}")
    with open(path, "rb") as f:
        return f.read(4)


def open_gguf_magic(path: str | os.PathLike) -> None:
    """A one-line error for a missing or non-GGUF file, reading only 4 bytes."""
    magic = read_magic(path)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (magic {magic!r})")


# general.type values as a user reads them, for "not a ..." errors
_TYPE_NOUNS = {GGUFType.ADAPTER: "a LoRA adapter", GGUFType.IMATRIX: "an imatrix",
               GGUFType.MODEL: "a model", NkatKeys.Covariance.TYPE: "a covariance file"}


class FastReader(GGUFReader):
    """gguf-py's GGUFReader (pinned: gguf==0.19.0), with metadata arrays parsed in one pass.

    The stock reader walks an array one element at a time through memmap slices: the tokenizer's
    vocabulary and merges (about 100,000 strings in SmolLM2, 300,000 in Qwen2.5) took 2-4 s per
    open of the demo model and 7-13 s of the 1.5B here, and a mix opens files dozens of times.
    This one reads the lengths from a memoryview and makes the same parts (views of one copy of
    the array's bytes), so fields, their indices and contents() are exactly the stock reader's
    (tests/test_gguf_reader.py compares the two). Nested arrays and byte-swapped files take the
    stock path."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = GGUFValueType(raw_itype[0]), int(alen[0])
        offs = orig_offs + 12
        parts: list = [raw_itype, alen]
        types = [GGUFValueType.ARRAY] + ([itype] if n else [])
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = np.array(self._get(offs, nptype, n))
            parts += [values[i:i + 1] for i in range(n)]
            return 12 + int(values.nbytes), parts, list(range(2, 2 + n)), types
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        view = memoryview(self.data)
        starts, pos = [], offs
        for _ in range(n):
            starts.append(pos)
            pos += 8 + int.from_bytes(view[pos:pos + 8], "little")
        if pos > len(self.data):
            raise ValueError("a string array runs past the end of the file")
        region = np.array(self.data[offs:pos])
        for start in starts:
            r = start - offs
            length = region[r:r + 8].view(np.uint64)
            parts += [length, region[r + 8:r + 8 + int(length[0])]]
        return pos - orig_offs, parts, list(range(3, 3 + 2 * n, 2)), types


def open_gguf(path: str | os.PathLike, expect_type: str | None = None, *,
              untyped_ok: bool = False) -> GGUFReader:
    """GGUFReader with one-line errors for missing, non-GGUF and truncated files, and for a
    general.type other than `expect_type` (a file without general.type passes if untyped_ok)."""
    open_gguf_magic(path)
    path = Path(path)
    try:
        reader = FastReader(path, "r")
        reader.nkat_path = path  # for error messages about its fields
    except UnicodeDecodeError:
        raise UserError(f"{path}: damaged GGUF (a key or tensor name is not valid UTF-8)") from None
    except (ValueError, IndexError, OSError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        raise UserError(f"{path}: unreadable or truncated GGUF ({exc})") from None
    if expect_type is not None:
        kind = field_value(reader, Keys.General.TYPE)
        if kind != expect_type and not (kind is None and untyped_ok):
            raise UserError(f"{path}: not {_TYPE_NOUNS.get(expect_type, repr(expect_type))} "
                            f"(its general.type is {kind!r})")
    return reader


@contextmanager
def write_gguf(path: str | os.PathLike, architecture: str = "", file_type: str | None = None,
               alignment: int | None = None):
    """A GGUFWriter for `path`, under a temporary name renamed into place when the block exits
    normally. In the block: add keys, then tensors, either whole (add_tensor: written at the
    end) or streamed (add_tensor_info for all, then start_data(writer), then
    write_tensor_data for each in the same order)."""
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), architecture)
        if alignment is not None:
            writer.data_alignment = int(alignment)
        if file_type is not None:
            writer.add_type(file_type)
        try:
            yield writer
            if writer.state in (WriterState.NO_FILE, WriterState.EMPTY):
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
        finally:
            writer.close()


def start_data(writer: GGUFWriter) -> None:
    """Header, keys and tensor index: what must precede streamed write_tensor_data calls."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def copy_metadata(writer: GGUFWriter, reader: GGUFReader, change=None) -> None:
    """Every key of `reader` except those GGUFWriter writes itself (architecture, GGUF.*);
    change(name, value) -> value, when given, may replace a value on the way."""
    for fld in reader.fields.values():
        if fld.name == Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = fld.contents()
        writer.add_key_value(fld.name, change(fld.name, value) if change else value, vtype, sub_type=sub_type)


def copy_tensor_info(writer: GGUFWriter, tensor) -> None:
    """A reader tensor's entry, bytes and type as stored (its data goes with write_tensor_data)."""
    writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)


def field_contents(field, path=None):
    """A metadata value; one-line error for a string that is not valid UTF-8."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        where = f"{path}: " if path else ""
        raise UserError(f"{where}metadata {field.name} is not valid UTF-8 (damaged GGUF)") from None
    except (ValueError, IndexError, TypeError) as exc:
        where = f"{path}: " if path else ""
        raise UserError(f"{where}metadata {field.name} is unreadable (damaged GGUF: {exc})") from None


def field_value(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field_contents(field, getattr(reader, "nkat_path", None))


class ModelFile:
    """A GGUF model opened for tensor-by-tensor reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        end = max((t.data_offset + t.n_bytes for t in self.reader.tensors), default=0)
        if end > self.file_size:
            raise UserError(f"{self.path}: truncated GGUF (tensor data ends past the file)")

    @property
    def architecture(self) -> str:
        return str(field_value(self.reader, Keys.General.ARCHITECTURE, "unknown"))

    @property
    def name(self) -> str:
        return str(field_value(self.reader, Keys.General.NAME, self.path.stem))

    @property
    def file_type(self) -> str:
        return str(field_value(self.reader, Keys.General.TYPE, GGUFType.MODEL))

    @property
    def is_adapter(self) -> bool:
        return self.file_type == GGUFType.ADAPTER

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint_file(self.path)

    def identity(self) -> ModelIdentity:
        return ModelIdentity(name=self.name, architecture=self.architecture, file_size=self.file_size,
                             fingerprint=self.fingerprint, path=str(self.path.resolve()))

    def target_names(self, globs: list[str] | None = None) -> list[str]:
        """Block weight matrices (2-D, not norms), optionally narrowed by glob patterns."""
        names = [
            n for n, t in self.tensors.items() if is_target_name(n) and len(t.shape) == 2
        ]
        if globs:
            gguf_globs = [g for pattern in globs for g in self.gguf_globs(pattern)]
            names = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in gguf_globs)]
            if not names:
                raise BadSetting(
                    Setting.LAYERS, f"{' '.join(globs)} matches no weight matrix in {self.path.name} "
                    "(names look like blk.0.attn_q.weight; Meta layers.0.attention.wq.weight and Hugging Face "
                    "model.layers.0.self_attn.q_proj.weight names are translated)"
                )
        return names

    @cached_property
    def _name_map(self):
        """gguf-py's table of Meta / Hugging Face tensor names -> GGUF names for this architecture."""
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

        arch = {name: a for a, name in MODEL_ARCH_NAMES.items()}.get(self.architecture, MODEL_ARCH.LLAMA)
        blocks = [int(m.group(1)) for m in map(_BLOCK_ID.match, self.tensors) if m]
        return get_tensor_name_map(arch, max(blocks, default=-1) + 1)

    def gguf_globs(self, pattern: str) -> list[str]:
        """One layer pattern as GGUF-name globs: GGUF names pass unchanged; Meta
        (layers.N.feed_forward.w1.weight) and Hugging Face (model.layers.N.mlp.gate_proj.weight)
        names, globs included, become the GGUF names they stand for (blk.N.ffn_gate.weight)."""
        if pattern.startswith("blk.") or not pattern.strip():
            return [pattern]
        key, suffix = pattern, ".weight"
        for end in (".weight", ".bias"):
            if pattern.endswith(end):
                key, suffix = pattern[: -len(end)], end
        mapping = self._name_map.mapping
        if key in mapping:
            return [mapping[key][1] + suffix]
        if any(c in key for c in "*?["):
            found = sorted({gguf for k, (_, gguf) in mapping.items() if fnmatch.fnmatchcase(k, key)})
            if found:
                return [name + suffix for name in found]
        return [pattern]

    def shape(self, name: str) -> tuple[int, int]:
        """(n_out, n_in) in numpy order; ggml's ne is (n_in, n_out)."""
        ne = self.tensors[name].shape
        return int(ne[1]), int(ne[0])

    def qtype(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantize(self, name: str) -> np.ndarray:
        """One weight matrix as float32 (n_out, n_in), checked for NaN/Inf."""
        raise_if_terminated()
        tensor = self.tensors[name]
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(
                f"{self.path.name}: {name} has quant type {tensor.tensor_type.name}, "
                "which gguf-py cannot dequantize"
            ) from None
        weights = np.asarray(weights, dtype=np.float32).reshape(self.shape(name))
        if not np.isfinite(weights).all():
            raise UserError(f"{self.path.name}: {name} contains NaN or Inf")
        return weights


def quant_type_by_name(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise UserError(f"unknown GGML type {name!r}") from None
