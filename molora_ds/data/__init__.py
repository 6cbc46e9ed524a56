"""Data: published schemas -> multiple-choice rows (formats), prompts and tokenisation (multiple_choice).

Nothing is imported here, so that reading the data does not pull in transformers.
"""
