"""Fraud detection on card transactions: tabular MLP with categorical embeddings (PyTorch + scikit-learn)."""
