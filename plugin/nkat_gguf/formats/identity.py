"""What names a model file for theta: recorded in a .nkat (nkat.base.*, nkat.reference.*) and
checked when theta is loaded onto a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # general.name, else the file's stem
    architecture: str  # general.architecture
    file_size: int
    fingerprint: str  # gguf_io.fingerprint_file: content, not path
    path: str  # where it was, resolved

    def as_dict(self) -> dict:
        return asdict(self)

    def content(self) -> dict:
        """What identifies the content wherever the file lies (name, size, fingerprint)."""
        return {"name": self.name, "file_size": self.file_size, "fingerprint": self.fingerprint}
