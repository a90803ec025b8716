"""llamaforge studio: the runs, their live curves, a job form generated from the schema, job launch and
a chat playground, in a browser, served from the package (no CDN, nothing fetched at runtime)."""
