"""Recommendation: NeuMF on implicit feedback, with embedding tables sharded across workers."""
