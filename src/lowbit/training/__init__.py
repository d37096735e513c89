"""Training: the config, the loop (handed its parts), the recipe that builds the parts from a config."""

from .._lazy import exports

__all__ = ["TrainConfig", "load_config", "train", "train_loop", "TrainState", "evaluate", "lm_loss", "Callback"]
__getattr__, __dir__ = exports(__name__, {
    "TrainConfig": ".config", "load_config": ".config", "train": ".recipe", "train_loop": ".loop",
    "TrainState": ".state", "evaluate": ".evaluation", "lm_loss": ".loss", "Callback": ".callbacks",
})
