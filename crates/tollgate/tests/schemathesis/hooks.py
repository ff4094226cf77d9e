"""What schemathesis cannot learn from /openapi.json: the checks that depend on the world.

Every bound the server checks on the shape of a request is in the document (`http/openapi.rs`).
The checks below depend on the moment, on the network and on earlier requests instead, so no JSON Schema can say them,
and a request refused only for them is not "schema-valid data the server must accept": such
cases are dropped from the positive ones. Negative cases keep them (the server refuses those
anyway), and every check still runs on every answer.
"""

from datetime import datetime, timezone
from uuid import uuid4

import schemathesis
from schemathesis import GenerationMode


@schemathesis.hook
def filter_case(ctx, case):
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return True
    body = case.body
    if not isinstance(body, dict):
        return True
    path = case.operation.path
    if path == "/admin/accounts/{id}/credits" and body.get("expires_at") is not None:
        # An expiry is for a grant: a correction (a negative amount) with one is a 400.
        amount = body.get("amount")
        if isinstance(amount, int) and amount < 0:
            return False
    if path == "/admin/accounts/{id}" and isinstance(body.get("low_balance"), dict):
        # Like a task's webhook_url, the notify URL must resolve to public addresses.
        return False
    if path in ("/admin/vouchers", "/admin/accounts/{id}/credits"):
        # `expires_at` must be in the future: a past one is a 400 by design.
        at = body.get("expires_at")
        if isinstance(at, str):
            try:
                when = datetime.fromisoformat(at.replace("Z", "+00:00"))
            except ValueError:
                return True
            if when.tzinfo is not None and when <= datetime.now(timezone.utc):
                return False
    if path == "/v1/images/generations":
        # A `webhook_url` is taken only when its host resolves to public addresses (the SSRF
        # rules), which no generated host does here; tests/webhooks.rs covers accepting one.
        if isinstance(body.get("webhook_url"), str):
            return False
    return True


@schemathesis.hook
def map_case(ctx, case):
    # A key used before with another body is 400 `idempotency_key_reused` (the contract): a
    # positive case gets a key of its own, still of the generated shape.
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
        headers = case.headers or {}
        key = headers.get("Idempotency-Key")
        if isinstance(key, str) and key:
            headers["Idempotency-Key"] = f"{key[:200]}-{uuid4().hex}"
    return case
