"""What a run folder says about its run, read from its files alone: `metrics.jsonl` (`metrics`),
one line per run for `lmforge runs` (`runs`), and the curves of `lmforge plot` (`plot`, matplotlib).

Nothing here imports training code or torch models: a run can be watched while it trains.
"""

SORT_KEYS = ("name", "step", "val_loss", "time")  # the orders of `lmforge runs --sort`
X_AXES = ("step", "tokens", "time")  # the x axes of `lmforge plot --x`
