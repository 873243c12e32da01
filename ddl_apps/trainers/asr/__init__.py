"""Speech recognition: torchaudio features and a Conformer-CTC acoustic model on the PyTorch engine."""
