"""Typed encoder errors. Each one knows its HTTP status, its TEI `error_type` and the field it names.

This is the one place where encoder failures are mapped to HTTP statuses; routes only render them.
"""

# the checkpoint refusals, shared with the build (common/encoder_checkpoint.py)
from engine_builder.common.encoder_checkpoint import ModelLoadError as ModelLoadError

# TEI's `error_type` by HTTP status, for refusals that carry none (the server's own: auth, body limit, admission);
# anything else 4xx is a "validation" error, as TEI names the 413 and 422 it answers.
TEI_ERROR_TYPES_BY_STATUS = {424: "backend", 429: "overloaded", 503: "unhealthy"}


def tei_error_type(status: int) -> str:
    """TEI's `error_type` for an HTTP status (TEI's own set: no client sees a type it does not know)."""
    return TEI_ERROR_TYPES_BY_STATUS.get(status, "backend" if status >= 500 else "validation")


class EncoderError(Exception):
    """A request the encoder engine will not or cannot serve."""

    status_code: int = 400
    openai_status_code: int | None = None  # where the OpenAI-style routes answer with another status than TEI's
    error_type: str = "validation"
    code: str = "invalid_value"  # the OpenAI envelope's `code`: a string on every server and route

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def openai_message(self) -> str:
        """The message on the OpenAI-style routes (the same, unless an error adds what an OpenAI client can do)."""
        return self.message


class InvalidRequestError(EncoderError):
    """A field with a value we cannot honour (400, names the field)."""


class EmptyInputError(EncoderError):
    """An empty list or an input with no tokens (TEI: 400, `empty`)."""

    code = "empty_input"
    error_type = "empty"


class BatchSizeError(EncoderError):
    """More inputs in one request than `max_client_batch_size`: 422 `validation` on TEI's routes, as TEI and BEI
    answer; 400 on the OpenAI-style routes, as every validation error there (the openai SDK raises BadRequestError)."""

    code = "too_many_inputs"
    status_code = 422
    openai_status_code = 400

    def __init__(self, num_inputs: int, max_inputs: int, *, param: str) -> None:
        super().__init__(f"batch size {num_inputs} > maximum allowed batch size {max_inputs}", param=param)
        self.max_inputs = max_inputs

    @property
    def openai_message(self) -> str:
        return (
            f"{self.message}: send at most {self.max_inputs} items in `{self.param}` per request, splitting larger "
            "lists over several requests"
        )


class InputTooLongError(EncoderError):
    """An input longer than the model's limit while truncation is off (TEI: 413 `validation`; OpenAI: 400)."""

    code = "context_length_exceeded"
    status_code = 413
    openai_status_code = 400


class UnsupportedTaskError(EncoderError):
    """The route needs a model of another kind (embeddings on a classifier, classification on a bi-encoder)."""

    code = "unsupported_task"


class OverloadedError(EncoderError):
    """Too many requests in flight (TEI: 429 `overloaded`)."""

    code = "server_overloaded"  # as the server's own admission 429 says it
    status_code = 429
    error_type = "overloaded"


class BackendError(EncoderError):
    """The model failed or produced non-finite scores (TEI: 424 `backend`)."""

    code = "backend_error"
    status_code = 424
    error_type = "backend"


class UnhealthyError(EncoderError):
    """The engine is not started or is shutting down (TEI: 503 `unhealthy`)."""

    code = "engine_unavailable"
    status_code = 503
    error_type = "unhealthy"


class ClientDisconnectedError(EncoderError):
    """The client went away before the answer (499, as nginx logs it and the generation routes count it): its
    waiting inputs were dropped, and nobody reads this answer."""

    code = "client_closed_request"
    status_code = 499
    error_type = "client_closed_request"
