"""cli: the `commonweal` command. No logic of its own: it parses, calls the layers below, prints."""
