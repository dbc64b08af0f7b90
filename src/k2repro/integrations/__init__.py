"""Adapters that audit other trainers through `k2repro.audit.start` (docs/audit-api.md).

`k2repro.integrations.hf` (extra `hf`: transformers) and `k2repro.integrations.lightning`
(extra `lightning`). Nothing here is imported by the core package: import the adapter you use.
"""
