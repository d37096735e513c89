"""Data: files → records → token ids + loss labels (by format) → batches."""

from .._lazy import exports

__all__ = ["Record", "load_records", "load_splits", "BUILTIN_DATASETS", "FORMATS", "IGNORE", "detect_format",
           "tokenize_records", "Tokenized", "collate", "Batches"]
__getattr__, __dir__ = exports(__name__, {
    "Record": ".records", "load_records": ".records", "load_splits": ".records", "BUILTIN_DATASETS": ".builtin",
    "FORMATS": ".formats", "IGNORE": ".formats", "detect_format": ".formats", "tokenize_records": ".formats",
    "Tokenized": ".formats", "collate": ".batching", "Batches": ".batching",
})
