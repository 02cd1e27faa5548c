"""Evaluation of a checkpoint: `lmforge eval` (tasks and loss), `audit`, `inspect`, `compare`.

The task metrics (accuracy, F1, BLEU, ROUGE) belong to the tasks: `lmforge.tasks.metrics`."""
