"""The koding/tunnel protocol that both sides speak on top of yamux.

``wire`` holds the constants and control messages, ``control`` the control
stream's handshake and framing, ``states`` koding's client states, and
``identifiers`` how an identifier (a secret) may appear in a log.
"""
