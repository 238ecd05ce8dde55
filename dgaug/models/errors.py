"""The one error type the model loaders raise, so the CLI can print it as a single line."""


class ModelError(Exception):
    """A model that cannot be loaded or run here, said in one line the user can act on."""
