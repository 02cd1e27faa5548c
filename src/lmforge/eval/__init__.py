"""Evaluation of a checkpoint: `lmforge eval` (tasks and loss), `audit`, `inspect`, `compare`, metrics."""
