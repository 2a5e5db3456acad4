"""Attention-guided CoT distillation: a small student learns the teacher's traces (cross-entropy) and the
teacher's stepwise attention on key information (a transfer loss), its layers aligned with the teacher's
by a learnable Mixture of Layers (docs/method.md, section 10).

- :mod:`~attnpo_train.distill.config`: the settings (:class:`DistillConfig`);
- :mod:`~attnpo_train.distill.objective`: the pure mathematics (layer mixtures, the fixed layer map,
  the transfer loss, the shuffled-steps control);
- :mod:`~attnpo_train.distill.data`: traces, key spans and the teacher's signal;
- :mod:`~attnpo_train.distill.loop`: the training loop (``attnpo-train distill``).
"""
