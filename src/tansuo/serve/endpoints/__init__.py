"""One endpoint per task: how a request becomes items for the model, and results become the answer.

An :class:`Endpoint` declares its route (``path``, ``summary``, ``request_model``), turns a validated request
into a list of items (rejecting bad input with an :class:`ApiError` before anything reaches the model), runs
batches of items from many requests on the model (``run``, called on the batcher's worker thread), and
shapes each request's results into its response (``answer``; streaming endpoints override it). An endpoint
class is registered for a task with ``@register_endpoint("task")``; a task may have several (each its own
route), and ``create_app`` adds whatever they declare.

Inputs are always data in the request body (texts, base64-encoded pictures, pixel arrays, prompts); no
request can name a file path.
"""

from tansuo.serve.endpoints import (  # noqa: F401
    detect,
    generate,
    image,
    openai,
    recommend,
    segment,
    text,
    translate,
)
from tansuo.serve.endpoints.base import (
    ENDPOINTS,
    ApiError,
    Endpoint,
    Limits,
    Submit,
    endpoints_for,
    register_endpoint,
)
from tansuo.serve.endpoints.generate import Generate
from tansuo.serve.endpoints.image import ImagePredict
from tansuo.serve.endpoints.openai import ChatCompletions, Completions
from tansuo.serve.endpoints.text import FillMask, TextPredict

__all__ = [
    "ENDPOINTS",
    "ApiError",
    "ChatCompletions",
    "Completions",
    "Endpoint",
    "FillMask",
    "Generate",
    "ImagePredict",
    "Limits",
    "Submit",
    "TextPredict",
    "endpoints_for",
    "register_endpoint",
]
