"""The API's JSON answers: strict JSON (NaN sent as null), like every other JSON spotrun
writes."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from spotrun.strictjson import json_bytes


class StrictJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)
