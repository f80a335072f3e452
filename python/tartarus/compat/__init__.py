"""Other sandbox SDKs' names on Tartarus (`tartarus.compat.e2b`)."""
