"""The stages' orchestration, one module each (`mmdd.stages.<name>.run(cfg)`), read top to bottom; the list of
stages is mmdd.stage_list."""
