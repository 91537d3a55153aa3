"""Stage 2, model: loading HF models, the embedded ``tiny`` default, rendering, packing, log-probs, generation,
the one training-loop helper and supervised warm start (``sft``).

``render`` turns messages into ``input_ids``, ``assistant_mask`` and ``turn_id`` from the chat template;
``packing`` builds padding-free buffers; ``logprobs`` computes packed per-token log-probs; ``train`` is the
optimiser/schedule shared by every stage that trains. Imports ``core`` and ``data``.
"""
