"""`llamaforge sweep`: train one job over a grid of overrides and compare the trials in one table.

grid.py expands `key=v1,v2` axes into trials and validates every trial config before anything runs;
runner.py trains (and evaluates) each trial in its own subprocess, so its peak memory is its own;
report.py writes the comparison (Markdown, JSON, HTML with a chart).
"""
