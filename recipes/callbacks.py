"""Trainer callbacks of the recipe: early stopping (transformers' own)."""

from transformers import EarlyStoppingCallback


def build(trainer, recipe_args, eval_rows) -> list:
    cbs = []
    if recipe_args.early_stopping_patience:
        cbs.append(
            EarlyStoppingCallback(
                early_stopping_patience=recipe_args.early_stopping_patience,
                early_stopping_threshold=recipe_args.early_stopping_threshold,
            )
        )
    return cbs
