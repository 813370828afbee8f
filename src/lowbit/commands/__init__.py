"""One module per `lowbit` subcommand."""
