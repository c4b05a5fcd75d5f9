"""The results tools: evaluate, predict and compare finished runs."""
