"""Every error a user can cause (bad flags, files, model folders, meshes, settings): UserError and its kinds, in
one place, so a module raises any of them without importing the module the others belong to.

Scripts turn a UserError into one line on stderr and its exit status (2: bad input; 3: a compile-only run
whose programs do not fit the slice); anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message says what was expected and what was found."""

    exit_status = 2


class AttentionError(UserError):
    """An attention setting, or a choice the platform or the shapes cannot serve."""


class UsageError(UserError):
    """A flag argparse refused, or a flag value out of range."""


class ConfigError(UserError):
    """A setting outside what the model accepts; the message says expected vs found."""


class MeshError(UserError):
    """A mesh that does not fit the devices or the model; the message says expected vs found."""


class ArtifactError(UserError):
    """A stage file is missing or does not have the expected layout; the message says expected vs found."""


class BatchError(UserError):
    """A prompt file, seed list or batch size that cannot be used."""


class DoesNotFit(UserError):
    """A compile-only run whose programs do not fit the slice: the message names the first one."""

    exit_status = 3


class LoadError(UserError):
    """A checkpoint that does not hold the weights the model expects."""


class FinetuneError(UserError):
    """A fine-tuned checkpoint that does not fit the base model."""


class LoraError(UserError):
    """A LoRA file that cannot be read or adapts no weight of the model."""


class TopologyError(UserError):
    """A slice name this toolkit cannot compile for, or a mesh that does not fit it."""


class CheckpointError(UserError):
    """A model id that does not lead to a usable Wan 2.1 diffusers folder."""
