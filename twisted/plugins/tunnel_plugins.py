# Import-light: twistd loads this on every run; the tap modules load on use.
from twisted.application.service import ServiceMaker

tunnelServer = ServiceMaker(
    "tunnel server",
    "tunnel.tap.server",
    "Public reverse-tunnel server (koding/tunnel compatible)",
    "tunnel-server",
)
tunnelClient = ServiceMaker(
    "tunnel client",
    "tunnel.tap.client",
    "Reverse-tunnel client: expose local servers through a tunnel server",
    "tunnel-client",
)
