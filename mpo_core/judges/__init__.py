"""Judges: label responses safe/unsafe/refusal/compliance (:mod:`.base`), offline by refusal patterns
(:mod:`.patterns`) or by an LLM safety classifier (:mod:`.guards`); :func:`.select.get_judge` picks one."""
