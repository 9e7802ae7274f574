"""Error types that name the offending file or field."""


class DataError(ValueError):
    """Bad input data: the message names the file/field, what is wrong and what was expected."""


class ParamsError(ValueError):
    """Invalid params.yaml: the message names the dotted key."""
