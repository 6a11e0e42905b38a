"""Errors in the shape OpenAI's API returns them: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request the server refuses; raised anywhere in a handler, answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_validation(errors: list[dict]) -> ApiError:
    """The first of pydantic's complaints about a request body, as one 400."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return invalid(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                       code="invalid_json")
    if kind == "extra_forbidden":
        return invalid(f"unsupported parameter: {param}", param=param, code="unsupported_parameter")
    if kind == "missing":
        return invalid(f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    where = f"{param}: " if param else ""
    return invalid(f"{where}{first['msg']}", param=param, code="invalid_value")
