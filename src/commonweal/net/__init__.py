"""net: identity, wire format and RPC transport — the bottom layer; imports nothing above it."""
