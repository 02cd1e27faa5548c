"""`lmforge serve`: an OpenAI-compatible HTTP server with batched decoding, and its web playground."""
