"""``mlo-mae tune``: a Ray Tune study of pretrain trials, recorded in MLflow.

A study lives in ``STORAGE/NAME/``: Tune's experiment state (what ``--resume``
restores), ``mlo-mae-study.yaml`` (the settings), ``space.yaml`` (the space as it
was read), one folder per trial under ``trials/`` (each a pretrain run, see
``trial``), and at the end ``results.csv`` and ``best-config.yaml``. In MLflow the
study is a parent run (the space, the options, the best value as trials finish,
the results and the best config as artifacts) and each trial a child run with
everything a pretrain run records.

One module per job: ``settings`` (typed records, saved as YAML), ``checks``
(before anything starts; concurrency), ``trial`` (the trial function),
``monitor`` (the Tune callback), ``results`` (the table, CSV, best config) and
``runner`` (start, run, resume). Importing this package does not import Ray.
"""
