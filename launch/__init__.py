"""Launchers: run the training job on this machine, on Vertex AI, or on Kubernetes."""
