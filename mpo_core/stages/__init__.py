"""The pipeline's stages, one module each, named as the stages are:

ingest -> translate -> [align] -> generate -> label -> pair -> filter -> reference -> train -> evaluate

Each module holds its stage's logic and its entry ``run_<stage>``; the stage table
(:mod:`mpo_core.plumbing.stage_table`) says what each reads and writes, and the runner
(:mod:`mpo_core.plumbing.runs`) decides whether it runs.
"""
