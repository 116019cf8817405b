"""Scoring model outputs against references: SQuAD EM/F1, ROUGE, BLEU, bootstrap intervals."""
