"""The ``context:`` section's training side: start the fine-tune from ``context.init_from``'s weights.

The config already carries the extended model (``sapwood.config.Config`` sets the RoPE scaling and
``max_context`` from the section, and the task reads ``context.seq_len``); this callback loads the
checkpoint's weights into the freshly built model before the first step (not on resume: the training
checkpoint holds the fine-tuned weights). Works for one process and for sharded (FSDP / TP) models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sapwood.train.callbacks import Callback


class InitFromCheckpoint(Callback):
    """Load ``folder``'s weights (a checkpoint folder) into the trainer's model at step 0."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def on_train_start(self, trainer: Any) -> None:
        if trainer.step != 0:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from sapwood.model.folder import read_weights

        state = read_weights(self.folder)
        missing, unexpected = set_model_state_dict(
            trainer.model, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        missing = [
            name for name in missing if name != "output.weight" or not trainer.config.model.tied_embeddings
        ]
        if missing or unexpected:
            from sapwood.errors import ConfigError

            raise ConfigError(f"context.init_from={self.folder}: its weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        trainer.log_event(
            "context_extension", init_from=str(self.folder),
            rope_scaling=trainer.config.model.rope_scaling.model_dump(exclude_none=True),
            max_context=trainer.config.model.max_context, seq_len=trainer.config.context.seq_len,
        )


def context_callbacks(config: Any) -> list[Callback]:
    return [InitFromCheckpoint(config.context.init_from)]
