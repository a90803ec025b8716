"""The general-ability suite: what a tune cost the base model, beside the domain eval.

Ten BIG-bench tasks (from the `bigbench` package on PyPI, sha256-checked, cached by the catalog),
100 fixed examples each, scored by the log-likelihood of the answer choices (no generation):
`suite` builds the examples, `scoring` computes choice log-probs in batches, `run` turns them into
metrics for `llamaforge eval --suite general`, the end of training and sweeps, `lm_eval` wraps our
loader for lm-evaluation-harness.
"""
