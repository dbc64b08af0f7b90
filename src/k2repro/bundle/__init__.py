"""The release bundle: a run published as one self-describing folder (docs/release-bundle.md).

Its own layer (above `tools`, below the CLI) because it reads everything below it: the audit
store and its lineage, the packed data and its loader, checkpoints, forensics reports. The
modules follow what a bundle holds and what is done with it:

- `export`: `export_run`, the whole export, built in a dot folder and renamed into place
- `tables`: the run's tables (per launch, stitched along the lineage) and the DuckDB file
- `data`: the packed data and tokenizer that ship, and the data order of every step
- `weights`: checkpoints as DCP folders and safetensors weights
- `card`: the model card (README.md) and its loss figure
- `manifest`: the format's names, MANIFEST.json and its own checksum
- `signing`: the ed25519 signature (MANIFEST.sig)
- `verify`: `verify_bundle`, every file against the manifest
- `importer`: `import_bundle`, a verified bundle into a store, paths moved to the copies
"""
