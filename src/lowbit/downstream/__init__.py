"""Zero-shot downstream evaluation through lm-evaluation-harness: the adapter around a lowbit model
(adapter, needs lm-eval), lowbit's offline tasks (items, tasks), paired differences (paired), tables (table)
and the `lowbit eval --tasks` driver (run). Only adapter and run's evaluation functions import lm_eval."""
