"""The paper's evaluations, one module each; `python -m training.evaluate <task>` runs them.

    common       loading a checkpoint, the chunked state-carrying forward, greedy decoding, progress
    report       results as JSON, Markdown tables and (when matplotlib is installed) PNG plots
    perplexity   PG19 perplexity by context length (Table 1)
    passkey      passkey retrieval by length and depth (Table 2)
    retrieval    multi-document retrieval under noise (Table 3)
    fidelity     ETMF and ECLMF memory fidelity (App. A.2)
    latency      forward and per-token generation latency (Sec. 5.2)
"""
