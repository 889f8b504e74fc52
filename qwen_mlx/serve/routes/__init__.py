"""The endpoints, one module per group, each an `APIRouter` over the serving core (`..core.Serving`).

`create_app` includes `ROUTERS` in order; a route reaches the engine only through the `Serving` that the
`ServingDep` parameter hands it (from `app.state`), and takes the API key check as `dependencies=guarded`.
"""

from __future__ import annotations

from . import chat, completions, messages, metrics, misc, responses

ROUTERS = [misc.router, chat.router, completions.router, messages.router, responses.router, metrics.router]
