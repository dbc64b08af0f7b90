"""The bottom layer: facts every other layer needs, computed in one place.

- `ids`: run ids (one rule for the trainer, the audit API, importers and tools)
- `hashing`: sha256 of files and the canonical hash of configs
- `atomic`: folders and files that appear whole or not at all
- `layout`: names on disk (checkpoint folders, the store's marker files, the store default)
- `checksums`: a folder's manifest of file sha256s (checkpoints), checked without torch
- `spike`: the robust-z spike rule shared by the training guard and forensics

Nothing here imports torch, pandas, pyarrow or any other k2repro layer (docs/architecture.md).
"""
