"""The one exception type for model files a user can fix (wrong file, missing file, bad download)."""


class ModelFileError(ValueError):
    """A model file is missing, damaged or of another model. The message says what to do."""
