"""runner's stand-in for Cog's package: only `python -m cog.server.http`."""
