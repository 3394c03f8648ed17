# Import-light: twistd loads this on every run; the tap modules load on use.
from twisted.application.service import ServiceMaker

tunnelServer = ServiceMaker(
    "tunnel server",
    "tunnel.tap.server",
    "A public reverse-tunnel server (koding/tunnel protocol).",
    "tunnel-server",
)
tunnelClient = ServiceMaker(
    "tunnel client",
    "tunnel.tap.client",
    "A reverse-tunnel client that exposes local servers.",
    "tunnel-client",
)
