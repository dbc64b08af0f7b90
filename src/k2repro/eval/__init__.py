"""Evaluation over a run's checkpoints: held-out perplexity (overall and per domain) and
memorization, written to the store's `evals` table (docs/eval.md). `runner` plans and drives,
`perplexity` and `memorization` compute."""
