"""Evaluation: protocols, metrics and reports (`evaluate.py`; periodic evaluation in training)."""
