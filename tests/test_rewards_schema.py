"""Schemathesis fuzzes every operation of the OpenAPI schema over a real socket: no 5xx, and every
response matches the documented schema and status codes (stub scorers via dependency overrides keep it fast).

The schema is taken from the app object at import (schemathesis' lazy `from_fixture` loader does not
work with pytest 9); the requests go to the same app served by uvicorn."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rewards.app.deps import get_geneval_scorer, get_ocr_scorer
from rewards.app.main import create_app
from rewards.app.settings import Settings
from tests.rewards_support import StubGeneval, StubOcr, serve_in_thread

TOKEN = "s3cret"

APP = create_app(Settings(scorers=[], token=TOKEN, max_items=8, max_image_pixels=1_000_000))
APP.dependency_overrides[get_ocr_scorer] = StubOcr
APP.dependency_overrides[get_geneval_scorer] = StubGeneval
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(APP) as base:
        yield base


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, url):
    # All default checks but "schema-valid data is accepted": the schema cannot say which strings
    # are decodable PNGs or which prompts hold quotes, and those are (rightly) 4xx.
    case.call_and_validate(
        base_url=url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        excluded_checks=[positive_data_acceptance],
        timeout=30,
    )
