"""Error types shared by the library, the CLI and the ROS node."""


class InputError(ValueError):
    """Bad user input: the message names the file (and line) or the thing that is wrong.

    The CLI prints it as one line and exits 2; the ROS node logs it and keeps running.
    """

    def __init__(self, message: str, path: object | None = None, line: int | None = None):
        where = ''
        if path is not None:
            where = f'{path}:{line}: ' if line is not None else f'{path}: '
        super().__init__(where + message)
        self.path = path
        self.line = line
