"""Checkpoint I/O for pelt: safetensors only, torch imported lazily.

Modules:
    header: parse and encode safetensors headers, dtype tables (standard library only).
    checkpoint: a checkpoint (file, directory or sharded directory) read from its headers.
    reader: lazy tensor reads (``TensorReader``) and ``load_file`` for small files.
    writer: the sharded writer, ``save_file``, shard planning.
    fingerprint: content and structure fingerprints, with their on-disk cache.
    atomic: the one write-to-temp-then-rename implementation every writer uses.
"""
