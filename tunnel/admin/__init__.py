"""The operator's side of a tunnel server: the admin API, the status page and
``tunnel-admin``, the command line client of the API."""
