"""Talking to a model: chat templates (`template`) and the `lmforge chat` terminal (`repl`)."""
