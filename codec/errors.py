class CodecError(ValueError):
    """Raised for every malformed, hostile or unsupported payload; the message names the offending field."""
