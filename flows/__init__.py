"""The Prefect flows (one per method), and the `adaptflow` CLI.

Importing this package changes nothing in the process: a command's start-up (process settings, signals, the
temporary server, logging) is `flows.startup.session`.
"""
