"""The operator's side of a tunnel server: the admin API, the status page and
``tunnel-admin``, the command line client of the API.

``service`` (``AdminService``, what ``--admin`` runs) puts together ``auth``
(the token), ``api`` (the klein routes) and ``status`` (the page); ``cli`` is
``tunnel-admin`` and talks to the API over HTTP only."""
