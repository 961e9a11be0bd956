"""Evaluation: compare generated text with references (exact match, BLEU-4, ROUGE-1/2/L)."""
