"""The refusals of checkpoint reads: each message is one line naming the file and what to do."""


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the tokenizer, data or model it is loaded into."""


class CorruptCheckpoint(CheckpointMismatch):
    """A checkpoint file whose bytes are not the ones recorded when it was written."""


class CheckpointFallbackWarning(UserWarning):
    """The live checkpoint was incomplete or corrupt; an earlier complete one is used."""
