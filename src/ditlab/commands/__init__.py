"""One module per `ditlab` subcommand: `add_arguments(parser)` and `run(args) -> int`.

The argument parsing and the printing live here; the work is done by the library packages.
"""
