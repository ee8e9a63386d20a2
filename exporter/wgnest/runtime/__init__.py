"""Runtime: the command line, the refresher, the HTTP server and its web config."""
