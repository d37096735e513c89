"""Data: ``datasets:`` entries (sources) → Arrow tables → token ids + loss labels (by format, cached) → batches,
padded or packed."""

from .._lazy import exports

__all__ = ["Record", "load_records", "load_splits", "BUILTIN_DATASETS", "FORMATS", "IGNORE", "detect_format",
           "tokenize_records", "Tokenized", "collate", "Batches", "DataSource", "parse_sources", "TokenTable",
           "source_tables", "PackedBatches", "pack_rows"]
__getattr__, __dir__ = exports(__name__, {
    "Record": ".records", "load_records": ".records", "load_splits": ".records", "BUILTIN_DATASETS": ".builtin",
    "FORMATS": ".formats", "IGNORE": ".formats", "detect_format": ".formats", "tokenize_records": ".formats",
    "Tokenized": ".formats", "collate": ".batching", "Batches": ".batching", "DataSource": ".sources",
    "parse_sources": ".sources", "TokenTable": ".table", "source_tables": ".table", "PackedBatches": ".packing",
    "pack_rows": ".packing",
})
