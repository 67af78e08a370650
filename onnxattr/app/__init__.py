"""The applications, the top layer: the command line (cli, cli_flags, cli_progress), the audit
report (report) and the sanity checks (sanity, similarity). They hold no logic the API lacks."""
