"""Self-synthesized questions: the policy writes new questions about the training images (MM-UPT's
in-context and direct synthesizing), offline (``mmupt synthesize``) or online while training.

- ``run``: ``synthesize`` — prompts, generation through any rollout engine, parsing, filters, answering;
- ``rows``: writing the result in the input's row format with provenance, the JSON summary, model steps;
- ``cli``: the ``mmupt synthesize`` subcommand;
- ``online``: ``PoolRefresher``, which replaces part of the training pool every ``synthesis.refresh_every`` steps.

The string-level rules (prompt wording, output format, filters, reason codes) are pure functions in
``mmupt_megatron.algorithms.synthesis``.
"""
