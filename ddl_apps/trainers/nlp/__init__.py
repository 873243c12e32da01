"""Text classification: fine-tuning a pretrained transformer (MiniLM-L6 by default) on the PyTorch engine."""
