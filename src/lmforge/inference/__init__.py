"""A checkpoint put to use: generation (`generate`), its text rules (`sampling`), and the loss over a
split (`loss`). Training, and every front end (`sample`, `chat`, `serve`, `eval`, `export`), build on it;
it imports nothing from them."""
