"""Serving: the web page and prediction API of a finished run."""
