class ConvertError(Exception):
    """A source that cannot be converted; the message names the file, tensor or field at fault."""
