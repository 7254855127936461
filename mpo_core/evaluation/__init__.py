"""Evaluation: the evaluation sets (:mod:`.sets`), measuring one model (:mod:`.measure`), EVAL rows with
intervals (:mod:`.summaries`), and models side by side with the written report (:mod:`.compare`)."""
