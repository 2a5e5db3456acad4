"""Credit strategies: how each training method turns a step's rollouts into per-token advantages.

``base`` holds the interface (``CreditStrategy``), the registry (``register``, ``strategy_class``, ``methods``)
and the one separate-forward path (``read_separately``); each family of strategies is one module:

- ``uniform``: "tlmre" and "rloo", the outcome advantage on every token;
- ``attnpo``: "attnpo", step rescaling by the Key-Focus Heads, with its research controls;
- ``preplan_anchor``: "preplan", "anchor", "coupled", amplification of the attention rhythm's critical tokens.

A strategy defined anywhere else trains once its module has run ``@register("name")`` on it.
"""

from attnpo_train.strategies.base import (
    CreditBatch,
    CreditStrategy,
    StrategyFile,
    methods,
    read_separately,
    register,
    strategy_class,
)
# the built-in strategies register themselves on import, in this order
from attnpo_train.strategies import uniform  # noqa: E402,F401,I001
from attnpo_train.strategies import attnpo  # noqa: E402,F401
from attnpo_train.strategies import preplan_anchor  # noqa: E402,F401

__all__ = ["CreditBatch", "CreditStrategy", "StrategyFile", "methods", "read_separately", "register", "strategy_class"]
