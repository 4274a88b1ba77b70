"""Downstream evaluation: multiple-choice and cloze tasks from local files, scored as
lm-evaluation-harness scores them, during training and on any checkpoint."""
