"""attnpo_train: length-penalised group RL with AttnPO stepwise advantage rescaling."""

__version__ = "0.1.0"
