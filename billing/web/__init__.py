"""The web console (``billing web``): the failed-charge queue and the rest of operations in
a browser, for the person on call.

It is a thin layer over the same service functions the CLI calls (``billing.ops``,
``settlement``, ``subscriptions``, ``webhooks``, ``deadletters``, ``reports``): every call
to them goes through ``billing.web.service``, so nothing the CLI decides is decided again
here. Pages are server-rendered HTML that work without JavaScript; the only script is a
small vendored file under ``static/``, served from the console's own origin.

- ``config``: the console's settings (``BILLING_CONSOLE_*``) and constants;
- ``security``: cookies, CSRF tokens, the Origin check, roles and the security headers;
- ``service``: the one door to the service layer (reads and actions);
- ``chart``: the overview's SVG chart, computed on the server;
- ``pages``: the routes; ``app``: the Starlette application.
"""
