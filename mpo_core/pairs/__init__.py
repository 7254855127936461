"""Preference quadruples after they are built: the noisy-pair filter (:mod:`.filtering`), its report
(:mod:`.filter_report`), and the supply of pairs per language (:mod:`.supply`)."""
