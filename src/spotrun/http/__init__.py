"""Everything spotrun serves over HTTP: the API, the dashboard, and the callbacks it sends.

``app``: the FastAPI app (``create_app``) and its lifespan; ``routes``: the API's routes;
``schemas``: its request and answer documents; ``errors``: its error answers;
``auth``: how a request proves who it is; ``feed``: the live feed behind the Server-Sent
Events; ``metrics``: ``/metrics``; ``limits``: the body limit; ``responses``: strict JSON;
``context``: what the routes and the pages share; ``callbacks``: the deliverer of job
callbacks (and the checks of their URLs); ``dashboard/``: the pages.

Routes and pages are thin: what they do, they ask of :mod:`spotrun.service`. Only
``app`` puts the parts together; nothing here imports ``app``.
"""
