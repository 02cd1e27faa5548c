"""Talking to a model: the `lmforge chat` terminal (`repl`). The chat templates it renders with
are data, below every package that reads them: `lmforge.data.chat_template`."""
