"""The rehearsal: a GPU run config run on this CPU, with only what needs a GPU substituted.

    substitution.py  TrainConfig -> (rehearsal TrainConfig, [Substitution]): pure, no I/O
    models.py        the real model's code-path choices, and the tiny model built with them
    cluster.py       a local Ray cluster of 1 or 2 nodes holding the config's role resources
    report.py        the run store's numbers -> per-step rows, sampler/learner agreement, verdict
    command.py       `blip3o-rl rehearse`: builds the tiny models, runs the real trainer, reports

It sits above rl/run: it drives the trainer through `rl.run.train.main` and nothing below imports it.
"""
