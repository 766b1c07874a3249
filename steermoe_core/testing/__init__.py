"""Random backbones for tests and benchmarks: tiny ones written to disk like a user's folders
(``random_backbones``) and real-shaped ones built straight on a device (``shapes``). Not core API."""
