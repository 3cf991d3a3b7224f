"""Why a guide cannot be enforced (the server answers 400 naming `param`)."""


class GuideError(ValueError):
    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param
