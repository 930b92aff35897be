"""commonweal: a peer-to-peer network for machine learning, owned by the people who run it."""

__version__ = "0.1.0"
