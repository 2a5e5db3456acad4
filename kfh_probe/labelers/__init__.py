"""Step labellers: turn traces into essential / redundant step labels nobody wrote by hand.

``kfh-probe label --traces F --labeler NAME --out F2`` segments traces that have no ``steps`` and
writes the same JSONL with every step labelled ``"essential"``, ``"redundant"`` or ``null``
(disputed or unknown; such steps are kept out of SRA pairs), each record naming the labeller
(``"labeler"``) and, where the steps were cut here, the segmenter's settings (``"segmenter"``), so a
sweep's manifest can say where its labels and steps came from.

Labellers (one module each, a shared driver in :mod:`.base`):

- ``given`` and ``organism`` (:mod:`.rules`): the file's own labels; the organism task's ground truth.
- ``post-answer`` (:mod:`.rules`): steps after the first one that states the answer are redundant.
- ``ablation`` (:mod:`.ablation`): a step is essential when deleting it lowers the model's
  log-probability of its final answer.
- ``judge`` (:mod:`.judge`, client in :mod:`.judge_client`): consensus of LLM judges.

:mod:`.report` measures every labeller against the organism's ground truth.
"""
