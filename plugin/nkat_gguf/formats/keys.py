"""Our own GGUF metadata keys, one home, the way gguf-py's constants.py holds llama.cpp's
(`gguf.Keys`, used directly for general.*, adapter.* and imatrix.* keys).

Every key we write under `nkat.` is named here; formats/nkat_format.py and
formats/covariance.py describe what each holds.
"""

from __future__ import annotations

PREFIX = "nkat."


class NkatKeys:
    """The .nkat adapter's keys (formats/nkat_format.py)."""

    VERSION = "nkat.version"
    THETA_RANK = "nkat.theta_rank"
    THETA_GAMMA = "nkat.theta_gamma"
    SOURCE = "nkat.source"
    STRUCTURE = "nkat.structure"
    THETA_TYPE = "nkat.theta_type"
    TENSOR_COUNT = "nkat.tensor_count"
    THETA_BYTES = "nkat.theta_bytes"
    IMATRIX = "nkat.imatrix"

    class Extra:
        """Keys of NkatMeta.extra: written as nkat.<key>, named here without the prefix."""

        RANK_ALLOCATION = "rank_allocation"  # uniform | budget (theta/pipeline.py)
        BUDGET_BYTES = "budget_bytes"  # the file's byte budget when allocation is budget
        COVARIANCE = "covariance"  # the covariance file theta was whitened with
        GROUPS = "groups"  # nkat optimize: the tensor groups (comma-separated) that carry theta
        OPTIMIZE_STUDY = "optimize.study"  # nkat optimize: the study that wrote the file
        OPTIMIZE_TRIAL = "optimize.trial"  # and its trial number

    class Identity:
        """nkat.base.* (the model theta corrects) and nkat.reference.* (what it was fitted to)."""

        BASE = "nkat.base"
        REFERENCE = "nkat.reference"
        # per identity: <prefix>.<field>
        NAME = "name"
        ARCHITECTURE = "architecture"
        FILE_SIZE = "file_size"
        FINGERPRINT = "fingerprint"
        PATH = "path"

    class Covariance:
        """The input covariance file (formats/covariance.py)."""

        TYPE = "nkat.covariance"  # its general.type
        VERSION = "nkat.covariance.version"
        DATASETS = "nkat.covariance.datasets"
        CHUNK_COUNT = "nkat.covariance.chunk_count"
        CHUNK_SIZE = "nkat.covariance.chunk_size"
        WEIGHTS = "nkat.covariance.weights"

    class Assembled:
        """Written into models assembled by formats/assemble.py (measure controls)."""

        CONTROL_FOR = "nkat.control.for"  # the .nkat a size-matched control stands in for
        RESTORED = "nkat.restored"  # the weight group restored from the reference
