"""The project's shared base, imported by data_prep/ and examples/distillation/ (never the reverse):

- cli:    the exit-code table, the error classes behind it, and the main wrapper of every command;
- fileio: crash-safe (atomic, fsynced) file writes;
- shards: the binarized token-shard format (read, write, manifest, validation).
"""
