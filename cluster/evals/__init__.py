"""``ragtune eval``: the fine-tune vs RAG decision, measured on the user's own data.

It lives under ``cluster/`` because it is a control-plane command like ``ragtune bench``: it
orchestrates the other paths (ingest into a scratch collection, optionally ``ragtune train``, the
served OpenAI API) rather than being one of them, and it asks every question through the served
stack so the numbers are the real system's.

    inputs.py   QA / update files → typed items (bad lines name file:line; gold ids checked)
    metrics.py  deterministic scores: SQuAD EM/F1, contains-answer, citations, refusals, bootstrap
    arms.py     the arms (base, rag, ft, ft+rag) asked through the OpenAI SDK, timed per request
    report.py   aggregation, the recommendation derived from the numbers, report.json/.md, chart
    cli.py      the command: local stack or ``--url``, training, freshness updates
"""
