"""The example http scorer (examples/http_scorer/brightness_scorer.py) as the tests drive it: loaded
from its file (it is not part of the package), with a request counter, failures on cue and a
second route that answers a constant (the "every reward is 0" failure)."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "http_scorer" / "brightness_scorer.py"


def load_example():
    """The example scorer's module, imported from its file."""
    spec = importlib.util.spec_from_file_location("brightness_scorer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class ControlledScorer:
    """The example app; POST /score answers `fail_status` from its `fail_from`-th request on (counted
    from 1; None: never), and POST /constant scores every image `constant`."""

    def __init__(self, fail_from: int | None = None, fail_status: int = 503, constant: float = 0.25):
        example = load_example()
        self.example = example
        self.fail_from, self.fail_status = fail_from, fail_status
        self.requests = 0
        """POST /score requests received (answered or failed)."""
        self.lock = threading.Lock()
        self.app = example.create_app()
        constant_app = example.create_app(lambda images, prompts, metadatas: [constant] * len(images), "constant",
                                          "constant-1")
        score_constant = next(route.endpoint for route in constant_app.routes if route.path == "/score")
        self.app.add_api_route("/constant", score_constant, methods=["POST"])

        @self.app.middleware("http")
        async def fail_on_cue(request: Request, call_next):
            if request.method == "POST" and request.url.path == "/score":
                with self.lock:
                    self.requests += 1
                    failing = self.fail_from is not None and self.requests >= self.fail_from
                if failing:
                    body = {"error": "down" if self.fail_status >= 500 else "refused", "message": "on cue", "item": None}
                    return JSONResponse(body, self.fail_status)
            return await call_next(request)
