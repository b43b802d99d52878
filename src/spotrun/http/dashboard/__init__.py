"""The dashboard: server-rendered pages (Jinja2, autoescaped) with a little JavaScript.

``pages``: the routes (sign-in, job list, a job's page, the submit form, the workers);
``sessions``: the session cookie and the same-origin guard of the forms;
``forms``: the submit form's fields from a pipeline's schema; ``jobview``: what a job's
page shows beyond its row (cost, curve, warnings); ``apidocs``: ``/docs`` from the
installed Swagger UI; ``templates/`` and ``static/`` are package data.

The dashboard does what the API does through the same service (:mod:`spotrun.service`):
it imports the service, :mod:`spotrun.http.auth` (the session cookie),
:mod:`spotrun.http.context` (what the app shares) and :mod:`spotrun.http.schemas`,
never the API's routes or the app.
"""
